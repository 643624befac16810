// Package tap opens Linux TAP devices and moves their file descriptors
// between processes.
//
// The shape follows wireguard-go's tun package: a small Device interface that
// the packet path depends on, with the Linux specifics behind it. A Device is
// a set of queues (one fd each) rather than a single fd so that a multi-queue
// TAP, and frames carrying a virtio-net header, fit without changing callers.
package tap

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"github.com/songgao/water"
	"golang.org/x/sys/unix"
)

// tunPath is where the kernel's TUN/TAP clone device lives.
const tunPath = "/dev/net/tun"

// Device is a TAP interface seen from the process that owns its queues.
type Device interface {
	// Name is the kernel interface name (e.g. "tap0") in the namespace
	// where the device was created.
	Name() string
	// Queues returns one open file per TAP queue. The files stay owned
	// by the Device: callers may use their fds but must not close them.
	Queues() []*os.File
	// Close closes every queue. Once the last queue of a non-persistent
	// TAP is closed, the kernel removes the interface.
	Close() error
}

// Options select how a TAP is created.
type Options struct {
	// Queues is the number of queues to open; more than one implies
	// IFF_MULTI_QUEUE. Zero means one.
	Queues int
	// Offload opens the queues with IFF_VNET_HDR and checksum and TCP
	// segmentation offload: every frame then carries a virtio-net header
	// (see VnetHdrLen).
	Offload bool
}

// TapDevice is the Linux implementation of Device.
type TapDevice struct {
	name   string
	queues []*os.File
}

var _ Device = (*TapDevice)(nil)

// Create creates (or attaches to an existing) TAP interface called name in
// the calling thread's network namespace.
func Create(name string, opts Options) (*TapDevice, error) {
	n := max(opts.Queues, 1)
	first, actual, open, multi, err := attachFirst(name, opts.Offload, n > 1)
	if err != nil {
		return nil, err
	}
	if !multi {
		n = 1
	}
	dev := &TapDevice{name: actual, queues: []*os.File{first}}
	for len(dev.queues) < n {
		f, _, err := open(name, multi)
		if err != nil {
			dev.Close()
			return nil, err
		}
		dev.queues = append(dev.queues, f)
	}
	return dev, nil
}

// opener attaches one queue to the TAP name (creating it if need be) and
// returns it with the interface's name.
type opener func(name string, multiQueue bool) (*os.File, string, error)

// attachFirst attaches the first queue and reports how the others must be
// opened. A TAP that exists already (a runtime may create it before
// starting the helper) accepts queues only of its own kind: TUNSETIFF fails
// with EINVAL when IFF_MULTI_QUEUE differs, so the other kind is tried, and
// a TAP without it gets one queue however many were asked for. A TAP
// without offloads (an old kernel, a /dev/net/tun emulated by a sandbox) is
// slower but works the same; every queue of one device must agree.
func attachFirst(name string, offload, multi bool) (f *os.File, actual string, open opener, gotMulti bool, err error) {
	opens := []opener{openQueue}
	if offload {
		opens = []opener{openOffloadQueue, openQueue}
	}
	for _, open := range opens {
		for _, mq := range []bool{multi, !multi} {
			if f, actual, err = open(name, mq); err == nil {
				return f, actual, open, mq, nil
			}
			if !errors.Is(err, unix.EINVAL) {
				break
			}
		}
		if !errors.Is(err, errNoOffload) {
			break
		}
	}
	return nil, "", nil, false, err
}

// openQueue opens one queue through songgao/water and takes its fd over.
// water wraps the fd in an *os.File registered with Go's poller; the packet
// path wants a plain fd it can hand to gVisor or to another process, so we
// duplicate it and close water's copy.
func openQueue(name string, multiQueue bool) (*os.File, string, error) {
	iface, err := water.New(water.Config{
		DeviceType: water.TAP,
		PlatformSpecificParams: water.PlatformSpecificParams{
			Name:       name,
			MultiQueue: multiQueue,
		},
	})
	if err != nil {
		return nil, "", explainOpenError(name, err)
	}
	defer iface.Close()
	sc, ok := iface.ReadWriteCloser.(syscall.Conn)
	if !ok {
		return nil, "", fmt.Errorf("open tap %q: unexpected device type %T", name, iface.ReadWriteCloser)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, "", fmt.Errorf("open tap %q: %w", name, err)
	}
	dup := -1
	var dupErr error
	if err := raw.Control(func(fd uintptr) {
		dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, "", fmt.Errorf("open tap %q: %w", name, err)
	}
	if dupErr != nil {
		return nil, "", fmt.Errorf("open tap %q: dup: %w", name, dupErr)
	}
	return os.NewFile(uintptr(dup), tunPath), iface.Name(), nil
}

// explainOpenError turns the usual failures of opening /dev/net/tun into
// messages that name the fix.
func explainOpenError(name string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("open tap %q: %s does not exist: load the tun module (modprobe tun) or, in a container, pass the device through (e.g. --device /dev/net/tun): %w", name, tunPath, err)
	case errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EPERM):
		mode := ""
		if st, serr := os.Stat(tunPath); serr == nil {
			mode = fmt.Sprintf(" (it is %v here)", st.Mode().Perm())
		}
		return fmt.Errorf("open tap %q: %s is not accessible%s: most distributions ship it as mode 0666 (check with `ls -l %s`; fix with `sudo chmod 0666 %s` or a udev rule): %w",
			name, tunPath, mode, tunPath, tunPath, err)
	}
	return fmt.Errorf("open tap %q: %w", name, err)
}

// FromFiles wraps queues received from another process (see RecvFiles).
// The Device takes ownership of the files.
func FromFiles(name string, queues []*os.File) *TapDevice {
	return &TapDevice{name: name, queues: queues}
}

// Name implements Device.
func (d *TapDevice) Name() string { return d.name }

// Queues implements Device.
func (d *TapDevice) Queues() []*os.File { return d.queues }

// Close implements Device.
func (d *TapDevice) Close() error {
	var errs []error
	for _, f := range d.queues {
		if err := f.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	d.queues = nil
	return errors.Join(errs...)
}
