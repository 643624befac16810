package test

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestUsernetSandboxNotTraceable: root in the container's user namespace,
// which the sandboxed helper joined, can neither ptrace the helper nor read
// its memory.
func TestUsernetSandboxNotTraceable(t *testing.T) {
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		t.Skip("our sandbox, not slirp4netns's")
	}
	wd := newWorld(t)
	sb := wd.startSandbox()
	u := wd.startUsernet("-c", "--enable-sandbox", "--enable-seccomp", fmt.Sprint(sb.pid), "tap0")
	out := wd.inSandbox(sb, bins.nettool, "ptrace-probe", fmt.Sprint(u.cmd.Process.Pid))
	t.Logf("as the namespace's root: %s", out)
	for _, f := range strings.Fields(out) {
		if strings.HasSuffix(f, "=ok") {
			t.Errorf("the container's root succeeded at %s on the sandboxed helper: %s", strings.TrimSuffix(f, "=ok"), out)
		}
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", u.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "NoNewPrivs:\t1") {
		t.Errorf("helper status lacks NoNewPrivs:\n%s", status)
	}
}
