// Package taptest helps tests that need a network namespace of their own
// (for a TAP, addresses, routes, nftables) without touching the host's.
package taptest

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// InFreshNetns runs f on a thread in a new network namespace and returns
// when f does. The thread is never returned to the scheduler, so the
// namespace dies with it. Sockets f creates belong to the namespace;
// goroutines f starts run elsewhere, but may use them. Without root the
// test is skipped.
func InFreshNetns(t testing.TB, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare: %v", err)
			return
		}
		f()
	}()
	<-done
}
