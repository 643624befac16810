package launcher

import (
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/ktcpnat"
)

// Published ports through the guest's kernel, with the client's address
// kept (package ktcpnat): the port helper makes marked, transparent sockets
// in the namespace, a batch at a time, and the caller binds each to the
// client's address and connects it to the guest's server (a socket's
// system calls act in the namespace it was made in); the guest's routes
// bring the server's answers back to it.

// maxSockets bounds the descriptors of one answer (what tap.RecvFiles
// takes).
const maxSockets = 64

// checkEvery is how long the port helper trusts what it found of the
// guest's rules and NAT: checking them costs a few netlink dumps.
const checkEvery = time.Second

// InboundSockets returns n (at most 64) fresh TCP sockets of the
// namespace, IPv4 or IPv6 ones, marked for published-port connections
// (ktcpnat.InboundMark) and transparent, for portfwd.KernelPath.
// ENOPROTOOPT: the guest has no routes for the family's connections.
func (h *PortHelper) InboundSockets(ipv6 bool, n int) ([]*os.File, error) {
	network := "tcp4"
	if ipv6 {
		network = "tcp6"
	}
	n = min(max(n, 1), maxSockets)
	return h.exchange(dialRequest{Network: network, Op: opSockets, Count: n}, n)
}

// inboundServer is the helper's side.
type inboundServer struct {
	// unfit is why the guest's kernel cannot take connections of each
	// family (nil: it can) as checked at checked.
	unfit   [2]error
	checked [2]time.Time
}

// fit checks, at most every checkEvery, that the guest's kernel can take
// connections of fam (0 IPv4, 1 IPv6): its routes are there, and no
// destination NAT of the guest's own that the connections would bypass.
func (in *inboundServer) fit(fam int, network string) error {
	if time.Since(in.checked[fam]) < checkEvery {
		return in.unfit[fam]
	}
	any := netip.IPv4Unspecified()
	if fam == 1 {
		any = netip.IPv6Unspecified()
	}
	in.checked[fam], in.unfit[fam] = time.Now(), nil
	switch {
	case !ktcpnat.InboundReady(any):
		in.unfit[fam] = fmt.Errorf("the guest has no routes for %s: %w", network, unix.ENOPROTOOPT)
	case ktcpnat.GuestNAT():
		in.unfit[fam] = fmt.Errorf("the guest has NAT rules of its own, which its kernel's path would bypass: %w", unix.ENOPROTOOPT)
	}
	return in.unfit[fam]
}

func (in *inboundServer) sockets(r dialRequest) ([]*os.File, error) {
	if r.Count < 1 || r.Count > maxSockets {
		return nil, fmt.Errorf("%d sockets: want 1 to %d", r.Count, maxSockets)
	}
	fam, domain := 0, unix.AF_INET
	switch r.Network {
	case "tcp4":
	case "tcp6":
		fam, domain = 1, unix.AF_INET6
	default:
		return nil, fmt.Errorf("network %q", r.Network)
	}
	// A guest that deletes the routes sends the server's answers out of
	// the TAP, where the userspace stack resets them: the caller uses a
	// batch for a second at most.
	if err := in.fit(fam, r.Network); err != nil {
		return nil, err
	}
	files := make([]*os.File, 0, r.Count)
	for range r.Count {
		f, err := markedSocket(domain)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, err
		}
		files = append(files, f)
	}
	return files, nil
}

func markedSocket(domain int) (*os.File, error) {
	transparent := []int{unix.SOL_IP, unix.IP_TRANSPARENT}
	if domain == unix.AF_INET6 {
		transparent = []int{unix.SOL_IPV6, unix.IPV6_TRANSPARENT}
	}
	// Blocking: the receiving side's os.File then stays out of its Go
	// poller, and it sets the flag on its own descriptor.
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// Set here, in batches, rather than per connection by the host
	// side: the address may have a TIME_WAIT socket of an earlier
	// connection, and a relay's small writes must leave at once.
	for _, o := range []struct{ level, name, value int }{
		{unix.SOL_SOCKET, unix.SO_MARK, ktcpnat.InboundMark},
		// The socket binds the client's address, which the
		// namespace does not have.
		{transparent[0], transparent[1], 1},
		{unix.SOL_SOCKET, unix.SO_REUSEADDR, 1},
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.name, o.value); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("socket option %d/%d: %w", o.level, o.name, err)
		}
	}
	return os.NewFile(uintptr(fd), "inbound"), nil
}
