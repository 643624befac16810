package portfwd

import (
	"log/slog"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// rawGuest is a Guest that takes accepted connections as raw descriptors
// (KernelPath, whose relay loop has them so): its forwards accept without
// the net package, which wraps each connection in a pollable descriptor
// and, per connection, makes calls through the scheduler that keep the
// runtime's monitor awake (see sockrelay.Loop).
type rawGuest interface {
	Guest
	// forwardRawTCP owns fd, the non-blocking socket of client.
	forwardRawTCP(fd int, client, guest netip.AddrPort) error
}

var _ rawGuest = (*KernelPath)(nil)

// acceptRaw is acceptTCP for a rawGuest, on the listener lf.
func (f *forward) acceptRaw(lf *os.File, guest rawGuest, log *slog.Logger) {
	rc, err := lf.SyscallConn()
	if err != nil {
		log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", err)
		return
	}
	for {
		fd, client, errno := -1, netip.AddrPort{}, unix.Errno(0)
		err := rc.Read(func(lfd uintptr) bool {
			fd, client, errno = sockrelay.Accept(lfd)
			return errno != unix.EAGAIN
		})
		switch {
		case err != nil:
			if !f.stopping.Load() {
				log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", err)
			}
			return
		case errno == unix.ECONNABORTED:
			continue
		case errno != 0:
			log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", errno)
			return
		}
		sockrelay.SetConnOptions(fd)
		target := f.rule.guestFor(client.Addr())
		// As acceptTCP's: the Guest owns the connection.
		go func() {
			if err := guest.forwardRawTCP(fd, client, target); err != nil {
				log.Debug("published tcp connection", "rule", f.rule.String(), "client", client, "err", err)
			}
		}()
	}
}
