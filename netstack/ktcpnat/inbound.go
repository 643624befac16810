package ktcpnat

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Published ports take the kernel path too. A connection from a host-side
// client C to the guest's server at G:P is opened inside the namespace by a
// socket of ours (launcher's port helper) marked InboundMark, made
// transparent (IP_TRANSPARENT: it may bind an address the namespace does
// not have), bound to C:c and connected to G:P. Its segments go to the
// namespace's loopback as to any local address, and the server sees the
// client's address (and port, when it was free) as the userspace stack
// would show it. The server's answers to C:c would be routed out of the
// TAP; they are not, because the namespace's kernel marks them too:
//   - net.ipv4.tcp_fwmark_accept: the server's socket of an accepted
//     connection takes the mark of the SYN that opened it, ours;
//   - net.ipv{4,6}.fwmark_reflect: so do the resets and ICMP errors that
//     answer a marked segment without a socket (a port nobody listens on
//     refuses at once);
//   - a rule routes marked packets by a table of their own (inboundTable),
//     whose only route makes every address local, over lo.
// Nothing rewrites a segment and nothing keeps an entry per connection: the
// segments take the routes the sockets keep, as any local connection's. An
// earlier design swapped the two addresses in the output hook, which made
// the kernel route every segment of both sides again; that was a seventh
// of a short connection's cost in the helper alone.
//
// The settings are the namespace's: the guest sees them (a socket it
// accepts takes the mark of the SYN, which only ours carry unless its own
// rules mark packets), and the guest may undo them, which InboundReady
// tells.

// InboundMark is the socket mark (SO_MARK) of the sockets that open
// published-port connections, and of the server's sockets that accept them.
const InboundMark = 0x6e72696e // "nrin"

// inboundTable is the routing table of marked packets, and inboundPref its
// rule's priority: before the main table's (32766), after the local one's
// (0), which still takes the namespace's own addresses.
const (
	inboundTable = 0x6e72696e
	inboundPref  = 100
)

// inboundSysctls must read 1 in the namespace (see above).
var inboundSysctls = [2][]string{
	{"/proc/sys/net/ipv4/tcp_fwmark_accept", "/proc/sys/net/ipv4/fwmark_reflect"},
	{"/proc/sys/net/ipv4/tcp_fwmark_accept", "/proc/sys/net/ipv6/fwmark_reflect"},
}

// familyIndex is 0 for IPv4 and 1 for IPv6, as in inboundSysctls.
func familyIndex(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return 0
	}
	return 1
}

func inboundRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = InboundMark
	r.Table = inboundTable
	r.Priority = inboundPref
	return r
}

func inboundRoute(family int, lo int) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if family == netlink.FAMILY_V6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{Family: family, Dst: dst, LinkIndex: lo, Table: inboundTable,
		Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
}

// installInbound makes the calling thread's network namespace route
// marked connections back to itself (see above): IPv4 ones, or an error,
// and IPv6 ones where the kernel has IPv6 (else InboundReady says no for
// them).
func installInbound() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("published ports: %w", err)
	}
	// The IPv6 route wants lo up, which the launcher's child brings up
	// meanwhile anyway.
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("published ports: bring up lo: %w", err)
	}
	for i, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		err := routeMarked(family, lo.Attrs().Index, inboundSysctls[i])
		if i == 0 && err != nil {
			return fmt.Errorf("published ports: %w", err)
		}
	}
	return nil
}

func routeMarked(family, lo int, sysctls []string) error {
	for _, name := range sysctls {
		if err := os.WriteFile(name, []byte("1"), 0); err != nil {
			return err
		}
	}
	// A rule left by an earlier helper in this namespace stays; one of
	// ours is enough.
	if err := netlink.RuleAdd(inboundRule(family)); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("routing rule: %w", err)
	}
	if err := netlink.RouteReplace(inboundRoute(family, lo)); err != nil {
		return fmt.Errorf("route: %w", err)
	}
	return nil
}

// InboundReady says whether the calling thread's network namespace routes
// the published-port connections of a's family back to itself (Install
// set it up; the guest may have undone it since, or the kernel may lack
// IPv6).
func InboundReady(a netip.Addr) bool {
	fi := familyIndex(a)
	for _, name := range inboundSysctls[fi] {
		b, err := os.ReadFile(name)
		if err != nil || strings.TrimSpace(string(b)) != "1" {
			return false
		}
	}
	family := netlink.FAMILY_V4
	if fi == 1 {
		family = netlink.FAMILY_V6
	}
	rules, err := netlink.RuleListFiltered(family, inboundRule(family), netlink.RT_FILTER_MARK|netlink.RT_FILTER_TABLE)
	if err != nil || len(rules) == 0 {
		return false
	}
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: inboundTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL && (r.Dst == nil || isDefault(r.Dst)) {
			return true
		}
	}
	return false
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

// netlinkSocket is a netfilter netlink socket of the calling thread's
// namespace whose answers time out: a stuck kernel must not hang a flow
// (see Map.roundTrip).
func netlinkSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return -1, fmt.Errorf("netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(time.Second.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("netlink socket: %w", err)
	}
	return fd, nil
}

// GuestNAT says whether the calling thread's network namespace
// destination-NATs connections: nftables chains of type nat on the
// prerouting or output hook, or iptables' (legacy) nat table. The
// published-port connections of the kernel path start in the namespace, so
// they would bypass prerouting's rules (podman's port forwarding into
// containers in its rootless network namespace, a redirect of a privileged
// port), which the userspace stack's connections, arriving on the TAP, go
// through, and would go through output's (a redirect of the guest's own
// traffic to a proxy), which the stack's do not.
func GuestNAT() bool {
	for _, name := range []string{"/proc/self/net/ip_tables_names", "/proc/self/net/ip6_tables_names"} {
		if b, err := os.ReadFile(name); err == nil && slices.Contains(strings.Fields(string(b)), "nat") {
			return true
		}
	}
	c, err := nftables.New()
	if err != nil {
		return false
	}
	defer c.CloseLasting()
	chains, err := c.ListChains()
	if err != nil {
		// No nftables here: no chains of the guest's either.
		return false
	}
	for _, ch := range chains {
		if ch.Type == nftables.ChainTypeNAT && ch.Hooknum != nil && (*ch.Hooknum == *nftables.ChainHookPrerouting || *ch.Hooknum == *nftables.ChainHookOutput) {
			return true
		}
	}
	return false
}
