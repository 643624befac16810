package launcher

import (
	"os/exec"
	"testing"
	"time"
)

// WatchExit reports a process that exited before the watch began, reaped
// (ESRCH) or not yet (a zombie: its pidfd is readable at once, and no
// later edge would wake a poller that waited first), and one that exits
// while watched.
func TestWatchExit(t *testing.T) {
	start := func() *exec.Cmd {
		cmd := exec.Command("sleep", "0.2")
		if err := cmd.Start(); err != nil {
			t.Skipf("sleep: %v", err)
		}
		return cmd
	}
	check := func(name string, gone <-chan struct{}, stop func(), err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		defer stop()
		select {
		case <-gone:
		case <-time.After(5 * time.Second):
			t.Errorf("%s: no exit seen", name)
		}
	}
	reaped := start()
	_ = reaped.Wait()
	gone, stop, err := WatchExit(reaped.Process.Pid)
	check("reaped", gone, stop, err)

	zombie := start()
	time.Sleep(500 * time.Millisecond)
	gone, stop, err = WatchExit(zombie.Process.Pid)
	check("zombie", gone, stop, err)
	_ = zombie.Wait()

	running := start()
	gone, stop, err = WatchExit(running.Process.Pid)
	check("running", gone, stop, err)
	_ = running.Wait()
}
