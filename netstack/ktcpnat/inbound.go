package ktcpnat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Published ports take the kernel path too. A connection from a host-side
// client C to the guest's server at G:P is opened inside the namespace by a
// socket of ours (launcher's port helper) marked InboundMark, bound to G:c
// and connected to C:P. Its segments leave with their addresses swapped,
// C:c to G:P, and the namespace's loopback delivers them to the server,
// which sees the client's address (and port, when it was free) as the
// userspace stack would show it. The server's answers, routed out of the
// TAP to C:c, are swapped back to C:P -> G:c and reach our socket. Swapping
// two addresses changes no checksum, and the ports stay as they are, so the
// rules keep no per-connection entries the helper must add: the first
// segment of each connection puts its key in inboundSet, and the helper
// removes it when the connection is over (Map.ForgetInbound).

// InboundMark is the socket mark (SO_MARK) of the sockets that open
// published-port connections.
const InboundMark = 0x6e72696e // "nrin"

// inboundRules: the marked socket's segments are swapped whatever their
// route (only they carry the mark); a marked segment the first rule did not
// take (the set is full) is dropped rather than sent to C:P for real, where
// the gateway's address would reach a host service. The server's answers
// are swapped only when routed out of the TAP, as the userspace stack would
// have needed them.
func (af addrFamily) inboundRules(oifname [unix.IFNAMSIZ]byte, inbound *nftables.Set) [][]expr.Any {
	rSaddr, rSport, rDaddr, rDport := af.keyRegs()
	mark := binary.NativeEndian.AppendUint32(nil, InboundMark)
	isMarked := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: mark},
	}
	// The addresses change places: the registers hold both, and each
	// write takes the other's.
	swap := []expr.Any{
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: rDaddr, Base: nh, Offset: af.saddr, Len: af.addrLen},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: rSaddr, Base: nh, Offset: af.daddr, Len: af.addrLen},
		&expr.Notrack{},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
	// The server-side key of our socket's segment (G:c -> C:P) is
	// G:P -> C:c: the ports loaded the other way round.
	ours := append(append([]expr.Any(nil), isMarked...),
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		load(rSaddr, nh, af.saddr, af.addrLen),
		load(rSport, th, 2, 2),
		load(rDaddr, nh, af.daddr, af.addrLen),
		load(rDport, th, 0, 2),
		&expr.Dynset{SrcRegKey: rSaddr, SetName: inbound.Name, SetID: inbound.ID, Operation: unix.NFT_DYNSET_OP_ADD},
	)
	ours = append(ours, swap...)
	strays := append(append([]expr.Any(nil), isMarked...), &expr.Verdict{Kind: expr.VerdictDrop})
	answers := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: oifname[:]},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		load(rSaddr, nh, af.saddr, af.addrLen),
		load(rSport, th, 0, 2),
		load(rDaddr, nh, af.daddr, af.addrLen),
		load(rDport, th, 2, 2),
		&expr.Lookup{SourceRegister: rSaddr, SetName: inbound.Name, SetID: inbound.ID},
	}
	answers = append(answers, swap...)
	return [][]expr.Any{ours, strays, answers}
}

// InboundKey names a published-port connection as the guest's server has
// it: Server is its address (G:P), Client the one it sees (C:c).
type InboundKey struct{ Server, Client netip.AddrPort }

// nftMsgDestroySetElem is NFT_MSG_DESTROYSETELEM (Linux 6.3; not in x/sys
// yet): a delete for which a missing element is no error.
const nftMsgDestroySetElem = 30

// maxPerKey bounds the keys that a kernel without NFT_MSG_DESTROYSETELEM
// deletes one transaction each once a batch of them was refused for one
// that is gone: each refused transaction costs milliseconds.
const maxPerKey = 16

// ForgetInbound removes the keys of connections that are over from
// inboundSet (ones not there are no error). Keys of both families may be
// mixed.
func (m *Map) ForgetInbound(keys []InboundKey) error {
	var errs []error
	for _, af := range addrFamilies {
		var es []entry
		for _, k := range keys {
			if k.Server.Addr().Is4() == (af.nfproto == unix.NFPROTO_IPV4) && k.Client.Addr().Is4() == k.Server.Addr().Is4() {
				es = append(es, entry{set: inboundSet, key: key(k.Server, k.Client)})
			}
		}
		if len(es) > 0 {
			errs = append(errs, m.forget(af.nfproto, es))
		}
	}
	return errors.Join(errs...)
}

func (m *Map) forget(nfproto uint8, es []entry) error {
	err := m.transaction(nfproto, nftMsgDestroySetElem, 0, es)
	switch {
	case err == nil, errors.Is(err, unix.ENOENT):
		// ENOENT: the set itself is gone (the guest deleted the
		// table), and its keys with it.
		return nil
	case !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EOPNOTSUPP):
		return err
	}
	// An older kernel: all in one transaction, which a key that is gone
	// (the guest flushed the set) refuses as a whole.
	err = m.transaction(nfproto, unix.NFT_MSG_DELSETELEM, 0, es)
	if !errors.Is(err, unix.ENOENT) {
		return err
	}
	if len(es) > maxPerKey {
		return fmt.Errorf("%d keys left in the set: %w", len(es), err)
	}
	var errs []error
	for _, e := range es {
		if err := m.transaction(nfproto, unix.NFT_MSG_DELSETELEM, 0, []entry{e}); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Dial returns a Map for the tables of the calling thread's network
// namespace (every thread of the process must be in it, as for Install):
// for launcher's port helper, which lives there.
func Dial() (*Map, error) {
	fd, err := netlinkSocket()
	if err != nil {
		return nil, err
	}
	return NewMap(os.NewFile(uintptr(fd), "nftables")), nil
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

// InboundReady says whether the calling thread's network namespace has the
// rules for published-port connections of a's family (Install made them;
// the guest may have deleted or flushed them since, or the kernel may lack
// IPv6 tables).
func InboundReady(a netip.Addr) bool {
	c, err := nftables.New()
	if err != nil {
		return false
	}
	defer c.CloseLasting()
	table := &nftables.Table{Family: familyOf(a).table, Name: tableName}
	if _, err := c.GetSetByName(table, inboundSet); err != nil {
		return false
	}
	rules, err := c.GetRules(table, &nftables.Chain{Name: chainName, Table: table})
	// Ours: three for published ports, two for the kernel TCP path.
	return err == nil && len(rules) >= 5
}

// GuestNAT says whether the calling thread's network namespace
// destination-NATs what it receives: nftables chains of type nat on the
// prerouting hook, or iptables' (legacy) nat table. The published-port
// connections the rules swap are untracked and arrive over lo, so they
// would bypass such rules (podman's port forwarding into containers in its
// rootless network namespace, a redirect of a privileged port), which the
// userspace stack's connections, arriving on the TAP, go through.
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
		// Unknown: the kernel path's rules need nftables anyway.
		return false
	}
	for _, ch := range chains {
		if ch.Type == nftables.ChainTypeNAT && ch.Hooknum != nil && *ch.Hooknum == *nftables.ChainHookPrerouting {
			return true
		}
	}
	return false
}
