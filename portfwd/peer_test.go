package portfwd

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestAPIRefusesGuest: a caller in the guest's user namespace, or in one
// nested in it, gets slirp4netns's error shape; any other caller is served.
func TestAPIRefusesGuest(t *testing.T) {
	if os.Getenv("PEER_TEST_CHILD") != "" {
		// The nested caller: a child in a user namespace of its own.
		os.Stdout.WriteString(apiRequest(t, os.Getenv("PEER_TEST_CHILD"), `{"execute":"list_hostfwd"}`))
		return
	}
	own, err := userNSAt("/proc/self/ns/user")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name    string
		guest   UserNS
		refused bool
	}{
		{"caller in the guest's namespace", own, true},
		{"caller elsewhere", UserNS{Dev: own.Dev, Ino: own.Ino + 1}, false},
	} {
		a := newTestAPI(t)
		a.RefuseGuest(c.guest, true)
		ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "api.sock"))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { defer close(done); a.Serve(t.Context(), ln) }()
		got := apiRequest(t, ln.Addr().String(), `{"execute":"list_hostfwd"}`)
		if refused := strings.HasPrefix(got, `{"error":{"desc":"permission denied:`); refused != c.refused {
			t.Errorf("%s: %s", c.name, got)
		}
		ln.Close()
		<-done
	}

	if os.Geteuid() != 0 {
		t.Skip("needs root to create a nested user namespace here")
	}
	// The guest is our own namespace; a caller in a child namespace of it
	// is refused too.
	a := newTestAPI(t)
	a.RefuseGuest(own, true)
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "api.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go a.Serve(t.Context(), ln)
	cmd := exec.Command(os.Args[0], "-test.run=^TestAPIRefusesGuest$")
	cmd.Env = append(os.Environ(), "PEER_TEST_CHILD="+ln.Addr().String())
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER}
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), `"permission denied:`) {
		t.Errorf("caller in a nested user namespace: %v\n%s", err, out)
	}
}

// apiRequest sends one request to the API socket at sock the way podman
// does (write, half-close) and returns the reply.
func apiRequest(t *testing.T, sock, req string) string {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	_ = c.(*net.UnixConn).CloseWrite()
	buf := make([]byte, 8192)
	n, _ := c.Read(buf)
	return string(buf[:n])
}
