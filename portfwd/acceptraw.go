package portfwd

import (
	"log/slog"
	"net/netip"
	"os"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// rawGuest is a Guest that takes accepted connections as raw descriptors
// (KernelPath, whose relay loop has them so): its forwards accept without
// the net package, which wraps each connection in a pollable descriptor
// and, per connection, makes calls through the scheduler that keep the
// runtime's monitor awake (see sockrelay.Loop).
type rawGuest interface {
	Guest
	// forwardRawTCP owns fd, the non-blocking socket of client. It
	// must not block: the accept loop calls it.
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
	// Accepted sockets inherit these options from the listener: four
	// system calls once, not per connection.
	_ = rc.Control(func(fd uintptr) { sockrelay.SetConnOptions(int(fd)) })
	var backoff sockrelay.AcceptBackoff
	for {
		fd, client, err := sockrelay.Accept(rc)
		if err != nil {
			if !f.stopping.Load() && backoff.Wait(err) {
				log.Debug("published port: accept", "rule", f.rule.String(), "err", err)
				continue
			}
			if !f.stopping.Load() {
				log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", err)
			}
			return
		}
		backoff.Reset()
		target := f.rule.guestFor(client.Addr())
		// As acceptTCP's: the Guest owns the connection.
		if err := guest.forwardRawTCP(fd, client, target); err != nil {
			log.Debug("published tcp connection", "rule", f.rule.String(), "client", client, "err", err)
		}
	}
}
