package tap

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/tap/taptest"
)

// persistentTap creates a TAP the way a runtime does before it starts the
// helper (ip tuntap add): persistent, no queue attached, IFF_MULTI_QUEUE
// or not.
func persistentTap(t *testing.T, name string, multi bool) {
	t.Helper()
	fd, err := unix.Open(tunPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		t.Fatal(err)
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if multi {
		flags |= unix.IFF_MULTI_QUEUE
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		t.Fatalf("make %s persistent: %v", name, err)
	}
}

// queueFlags reports the TAP flags a queue was attached with.
func queueFlags(t *testing.T, dev *TapDevice) uint16 {
	t.Helper()
	ifr, err := unix.NewIfreq("")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(int(dev.Queues()[0].Fd()), unix.TUNGETIFF, ifr); err != nil {
		t.Fatal(err)
	}
	return ifr.Uint16()
}

// TestCreateQueues: a new TAP gets the queues asked for; an existing one is
// attached in its own mode, one queue when it is not multi-queue, with the
// offloads either way.
func TestCreateQueues(t *testing.T) {
	taptest.InFreshNetns(t, func() {
		for _, c := range []struct {
			name        string
			existing    *bool // nil: the TAP does not exist yet
			ask, queues int
			multi       bool
		}{
			{name: "new", ask: 3, queues: 3, multi: true},
			{name: "new, one queue", ask: 1, queues: 1},
			{name: "existing single-queue", existing: new(false), ask: 3, queues: 1},
			{name: "existing multi-queue", existing: new(true), ask: 2, queues: 2, multi: true},
			{name: "existing multi-queue, one asked", existing: new(true), ask: 1, queues: 1, multi: true},
		} {
			if c.existing != nil {
				persistentTap(t, "tap0", *c.existing)
			}
			dev, err := Create("tap0", Options{Queues: c.ask, Offload: true})
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
				continue
			}
			flags := queueFlags(t, dev)
			if got := len(dev.Queues()); got != c.queues || (flags&unix.IFF_MULTI_QUEUE != 0) != c.multi {
				t.Errorf("%s: %d queues, flags %#x; want %d, multi-queue %v", c.name, got, flags, c.queues, c.multi)
			}
			if got := VnetHdrLen(dev.Queues()[0]); got != VnetHdrSize {
				t.Errorf("%s: no offloads (virtio-net header %d)", c.name, got)
			}
			if c.existing != nil {
				if err := unix.IoctlSetInt(int(dev.Queues()[0].Fd()), unix.TUNSETPERSIST, 0); err != nil {
					t.Errorf("%s: %v", c.name, err)
				}
			}
			dev.Close()
		}
	})
}

// TestCreateBusy: a single-queue TAP that another process holds is not
// shared, whatever the number of queues asked for.
func TestCreateBusy(t *testing.T) {
	taptest.InFreshNetns(t, func() {
		held, err := Create("tap0", Options{Offload: true})
		if err != nil {
			t.Error(err)
			return
		}
		defer held.Close()
		for _, n := range []int{1, 2} {
			if dev, err := Create("tap0", Options{Queues: n, Offload: true}); err == nil {
				dev.Close()
				t.Errorf("%d queues: attached to a TAP in use", n)
			} else if !errors.Is(err, unix.EBUSY) {
				t.Errorf("%d queues: %v, want EBUSY", n, err)
			}
		}
	})
}
