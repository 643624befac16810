// Package test holds the integration tests: they build the real binaries,
// make a small world of network namespaces with test hosts on documentation
// addresses, run netns-run in it as an unprivileged user and check real
// traffic. Nothing leaves loopback or the namespaces a test creates.
package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// bins are the binaries under test, built once per run into a directory
// that the unprivileged test user can read.
var bins struct {
	dir      string
	netnsRun string
	usernet  string
	nettool  string
}

// unprivUID runs the rootless path: nobody on Debian.
const unprivUID = 65534

const tunDevice = "/dev/net/tun"

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "netns-run-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	bins.dir = dir
	bins.netnsRun = filepath.Join(dir, "netns-run")
	bins.usernet = filepath.Join(dir, "usernet")
	bins.nettool = filepath.Join(dir, "nettool")
	for out, pkg := range map[string]string{bins.netnsRun: "../cmd/netns-run", bins.usernet: "../cmd/usernet", bins.nettool: "./nettool"} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n", pkg, err)
			return 1
		}
	}
	// Run the usernet tests against another slirp4netns-compatible binary
	// (e.g. the real /usr/bin/slirp4netns) to compare behaviour.
	if alt := os.Getenv("USERNET_UNDER_TEST"); alt != "" {
		bins.usernet = alt
	}
	if os.Geteuid() == 0 {
		restore, err := openTunForEveryone()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer restore()
	}
	return m.Run()
}

// openTunForEveryone gives /dev/net/tun the mode most distributions ship
// (0666) for the unprivileged test user, and returns how to put it back.
func openTunForEveryone() (func(), error) {
	st, err := os.Stat(tunDevice)
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", tunDevice, err)
	}
	old := st.Mode().Perm()
	if err := os.Chmod(tunDevice, 0o666); err != nil {
		return nil, fmt.Errorf("chmod %s: %w", tunDevice, err)
	}
	return func() { _ = os.Chmod(tunDevice, old) }, nil
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to build namespaces and veth links for the test world (CI runs as root)")
	}
	for _, tool := range []string{"ip", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (iproute2 / util-linux): %v", tool, err)
		}
	}
}
