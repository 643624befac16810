package portfwd

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// AutoInterval is how often the auto mode looks at the listening sockets,
// as pasta does.
const AutoInterval = time.Second

// ProcNet reads the listening sockets from /proc/net/tcp, tcp6, udp or
// udp6 files (of whichever namespace they were opened in): TCP sockets in
// LISTEN, UDP sockets bound and not connected.
type ProcNet struct {
	Files []*os.File
	UDP   bool
	// SkipFrom..SkipTo is left out for UDP: the ephemeral range, where
	// unconnected client sockets (resolvers) live.
	SkipFrom, SkipTo uint16
	// Own is the port of the helper's own TCP listener in the namespace
	// (the kernel TCP path's; 0: none): not the guest's to publish.
	Own uint16
}

// Scan returns the listening ports.
func (p ProcNet) Scan() (map[uint16]bool, error) {
	ports := map[uint16]bool{}
	for _, f := range p.Files {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
		b, err := io.ReadAll(io.LimitReader(f, 64<<20))
		if err != nil {
			return nil, err
		}
		for _, port := range ListeningPorts(b, p.UDP) {
			if p.UDP && port >= p.SkipFrom && port <= p.SkipTo || !p.UDP && port == p.Own {
				continue
			}
			ports[port] = true
		}
	}
	return ports, nil
}

// Close closes the files.
func (p ProcNet) Close() error {
	for _, f := range p.Files {
		f.Close()
	}
	return nil
}

// ListeningPorts parses the text of a /proc/net/{tcp,udp}[6] file.
func ListeningPorts(b []byte, udp bool) []uint16 {
	want := "0A" // TCP_LISTEN
	if udp {
		want = "07" // TCP_CLOSE: bound, unconnected
	}
	var out []uint16
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 512), 4096)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || f[3] != want {
			continue
		}
		_, portHex, ok := strings.Cut(f[1], ":")
		if !ok {
			continue
		}
		port, err := strconv.ParseUint(portHex, 16, 16)
		if err != nil || port == 0 {
			continue
		}
		if udp && !unconnected(f[2]) {
			continue
		}
		out = append(out, uint16(port))
	}
	return out
}

// unconnected reports whether a rem_address field is the wildcard.
func unconnected(rem string) bool {
	return strings.Trim(rem, "0:") == ""
}

// SocketPort returns the local port of the socket f (0 if f is nil or not
// a bound IP socket).
func SocketPort(f *os.File) uint16 {
	if f == nil {
		return 0
	}
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		return 0
	}
	return portOf(sa)
}

// portOf is an IP socket address's port (0: not an IP one).
func portOf(sa unix.Sockaddr) uint16 {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return uint16(sa.Port)
	case *unix.SockaddrInet6:
		return uint16(sa.Port)
	}
	return 0
}

// EphemeralPorts returns the kernel's range for automatic local ports.
func EphemeralPorts() (from, to uint16) {
	from, to = 32768, 60999
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return from, to
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return from, to
	}
	lo, err1 := strconv.ParseUint(f[0], 10, 16)
	hi, err2 := strconv.ParseUint(f[1], 10, 16)
	if err1 != nil || err2 != nil || lo > hi {
		return from, to
	}
	return uint16(lo), uint16(hi)
}

// Follower keeps a PortMap's rules for one protocol in step with the
// listening sockets on the other side (pasta's "auto"): a port that starts
// listening there gets its rules, one that stops loses them.
type Follower struct {
	Map   *PortMap
	Proto string
	// Scan lists the ports listening on the other side.
	Scan func() (map[uint16]bool, error)
	// Rules are the rules that forward port.
	Rules func(port uint16) []Rule
	// Skip, if set, leaves out ports: our own sockets over there.
	Skip func(port uint16) bool
	Log  *slog.Logger

	ids map[uint16][]int
	// failed holds ports that could not be bound here, not tried again
	// while they keep listening there.
	failed map[uint16]bool
}

// Sync makes one pass.
func (f *Follower) Sync() error {
	if f.ids == nil {
		f.ids, f.failed = map[uint16][]int{}, map[uint16]bool{}
	}
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	ports, err := f.Scan()
	if err != nil {
		return err
	}
	for port, ids := range f.ids {
		if ports[port] {
			continue
		}
		for _, id := range ids {
			_ = f.Map.Remove(id)
		}
		delete(f.ids, port)
		f.Log.Debug("auto forward removed", "proto", f.Proto, "port", port)
	}
	for port := range f.failed {
		if !ports[port] {
			delete(f.failed, port)
		}
	}
	for port := range ports {
		if _, ok := f.ids[port]; ok || f.failed[port] || (f.Skip != nil && f.Skip(port)) {
			continue
		}
		var ids []int
		for _, r := range f.Rules(port) {
			id, err := f.Map.Add(r)
			if err != nil {
				f.Log.Debug("auto forward not bound", "rule", r.String(), "err", err)
				continue
			}
			ids = append(ids, id)
		}
		if len(ids) == 0 {
			f.failed[port] = true
			continue
		}
		f.ids[port] = ids
		f.Log.Debug("auto forward added", "proto", f.Proto, "port", port)
	}
	return nil
}

// run syncs every AutoInterval until ctx ends.
func (f *Follower) run(ctx context.Context) {
	t := time.NewTicker(AutoInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := f.Sync(); err != nil {
			f.Log.Warn("auto port forwarding: scan failed", "proto", f.Proto, "err", err)
		}
	}
}

// OpenProcNet opens the /proc/net files of proto ("tcp" or "udp", both
// families) with open and returns their scanner; UDP leaves out the
// ephemeral ports.
func OpenProcNet(open func(name string) (*os.File, error), proto string) (ProcNet, error) {
	p := ProcNet{UDP: proto == "udp"}
	if p.UDP {
		p.SkipFrom, p.SkipTo = EphemeralPorts()
	}
	for _, name := range []string{proto, proto + "6"} {
		f, err := open(name)
		if err != nil {
			p.Close()
			return ProcNet{}, fmt.Errorf("auto port forwarding: %w", err)
		}
		p.Files = append(p.Files, f)
	}
	return p, nil
}

// RunFollowers syncs each follower once, so that what listens already is
// forwarded when it returns, then keeps them in step every AutoInterval
// until ctx ends or stop is called; stop waits for them.
func RunFollowers(ctx context.Context, followers []*Follower) (stop func(), err error) {
	for _, f := range followers {
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("auto port forwarding: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, f := range followers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.run(ctx)
		}()
	}
	return func() {
		cancel()
		wg.Wait()
	}, nil
}
