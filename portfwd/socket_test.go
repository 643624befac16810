package portfwd

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAPISocketKeepsOthersFiles: --api-socket replaces nothing but a stale
// socket, and at exit removes the socket only if it is still the one it
// created.
func TestAPISocketKeepsOthersFiles(t *testing.T) {
	dir := t.TempDir()

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenAPISocket(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("a regular file at the path: %v, want a refusal naming it", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "precious" {
		t.Errorf("the regular file was touched: %q, %v", b, err)
	}

	// A symlink is not followed nor replaced.
	link := filepath.Join(dir, "link")
	if err := os.Symlink(file, link); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenAPISocket(link); err == nil {
		t.Error("a symlink at the path was replaced")
	}
	if _, err := os.Lstat(link); err != nil {
		t.Errorf("the symlink is gone: %v", err)
	}

	// Another instance's socket, in use.
	live := filepath.Join(dir, "live.sock")
	other, err := net.ListenUnix("unix", &net.UnixAddr{Name: live, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := ListenAPISocket(live); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("a socket in use: %v, want a refusal", err)
	}
	if c, err := net.Dial("unix", live); err != nil {
		t.Errorf("the other instance's socket no longer answers: %v", err)
	} else {
		c.Close()
	}

	// A stale socket (its owner is gone) is replaced, as slirp4netns does.
	stale := filepath.Join(dir, "stale.sock")
	gone, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	gone.SetUnlinkOnClose(false)
	gone.Close()
	sock, err := ListenAPISocket(stale)
	if err != nil {
		t.Fatalf("a stale socket: %v", err)
	}
	if err := sock.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("our socket was not removed at close: %v", err)
	}

	// Replaced while we ran: what is there now is not ours to remove.
	path := filepath.Join(dir, "api.sock")
	sock, err = ListenAPISocket(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(file, path); err != nil {
		t.Fatal(err)
	}
	if err := sock.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
		t.Errorf("close removed a file it did not create: %q, %v", b, err)
	}
}
