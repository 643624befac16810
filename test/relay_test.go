package test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestGuestResetAfterFIN: a guest that half-closes its connection and then
// resets it resets the host side too, although the host has nothing to send
// (before, nothing watched the guest's side once it had sent its FIN, and
// the host's server sat in CLOSE_WAIT until it wrote something, or until
// netns-run ended).
func TestGuestResetAfterFIN(t *testing.T) {
	wd := newWorld(t)
	state := filepath.Join(t.TempDir(), "state")
	wd.startServer(wd.w, "close-wait-server", "127.0.0.1:8091", state)
	// The guest stays up after its reset: netns-run's exit would end the
	// flow anyway.
	ctx, cancel := context.WithCancel(context.Background())
	cmd := wd.guestCommand(ctx, nil, "sh", "-c", bins.nettool+" fin-then-reset 10.0.2.2:8091 && exec sleep 600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})
	// Bounded only so that a broken run ends.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if b, _ := os.ReadFile(state); strings.TrimSpace(string(b)) == "reset" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the host side of the flow was not reset after the guest reset it")
		}
	}
}
