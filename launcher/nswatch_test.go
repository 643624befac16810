package launcher

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("no removal noticed after %s", what)
	}
}

func TestWatchRemovalFile(t *testing.T) {
	dir := t.TempDir()
	for _, remove := range []func(path string) error{
		os.Remove,
		func(path string) error { return os.Rename(path, path+".moved") },
	} {
		path := filepath.Join(dir, "netns")
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		gone, err := WatchRemoval(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		// Another file in the directory going away is no sign.
		other := filepath.Join(dir, "other")
		_ = os.WriteFile(other, nil, 0o600)
		_ = os.Remove(other)
		select {
		case <-gone:
			t.Fatal("removal reported for another file")
		case <-time.After(50 * time.Millisecond):
		}
		if err := remove(path); err != nil {
			t.Fatal(err)
		}
		waitClosed(t, gone, "removing the file")
		cancel()
	}
	if gone, err := WatchRemoval(context.Background(), filepath.Join(dir, "never-there")); err != nil {
		t.Fatal(err)
	} else {
		waitClosed(t, gone, "watching a missing file")
	}
}

func TestWatchRemovalProc(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	gone, err := WatchRemoval(context.Background(), fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	waitClosed(t, gone, "the process exited")
}
