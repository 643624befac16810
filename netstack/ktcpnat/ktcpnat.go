// Package ktcpnat moves the kernel TCP path's address translation into the
// guest's own kernel.
//
// The kernel TCP path (netstack/ktcp.go) ends the guest's outbound TCP at a
// listener of ours inside the guest's namespace: the helper reads every
// segment from the TAP, rewrites its addresses and writes it back. Once a
// flow's host side is connected, an nftables map in the guest's namespace
// can do that rewrite instead, in the output hook: the segments then go
// from the guest's socket to the listener's over the namespace's loopback,
// and never cross the TAP. Per 1-byte round trip that saves four TAP reads
// and writes and the guest's trips through the TAP driver; for bulk data, a
// copy out of the kernel and one back in per segment.
//
// Install runs in the namespace (the launcher's child) and creates the
// table; the helper, outside, adds and removes each flow's two map entries
// over the netlink socket Install returns (a netlink socket acts in the
// namespace it was made in, and the helper, as the owner of the guest's
// user namespace, holds CAP_NET_ADMIN there). SYNs still cross the TAP, so
// the helper holds a flow's first until its host connect succeeds, exactly
// as without the map.
//
// Install also sets up the namespace's routes for published ports' TCP
// connections through the guest's kernel (inbound.go: InboundMark), which
// need no table and no entry per connection.
package ktcpnat

import (
	"fmt"
	"net/netip"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

const (
	tableName = "netns_run_tcp"
	// outMap translates the guest's side of each flow, backMap the
	// listener's; localSet holds the listener-side keys of flows whose
	// guest side the rule translated (see rules).
	outMap   = "out"
	backMap  = "back"
	localSet = "local"
	// chainName is the route chain of the output hook with every rule.
	chainName = "out"
	// mapSize bounds each map; a flow past it keeps the TAP path.
	mapSize = 65536
)

// Install creates the tables (ip, and ip6 where the kernel has it) in the
// calling thread's network namespace for the segments routed out of the
// interface tapName (which need not exist yet), and returns a netlink
// socket of that namespace for Map. It also sets up the routes of
// published-port connections (see InboundMark), which need no tables.
// Every thread of the process must be in the namespace (the launcher's
// child joins it before the Go runtime starts).
func Install(tapName string) (*os.File, error) {
	if len(tapName) == 0 || len(tapName) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tap name %q", tapName)
	}
	// Without them, published ports keep the userspace stack
	// (InboundReady says so to the port helper).
	_ = installInbound()
	var oifname [unix.IFNAMSIZ]byte
	copy(oifname[:], tapName)
	// Both families in one transaction (each commit costs a few ms of
	// the namespace's start); without IPv6 tables, IPv4 alone, and IPv6
	// flows keep the TAP path.
	if err := installFamilies(oifname, addrFamilies[:]...); err != nil {
		if err := installFamilies(oifname, addrFamilies[0]); err != nil {
			return nil, err
		}
	}
	fd, err := netlinkSocket()
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "nftables"), nil
}

// addrFamily is what the tables and rules of one address family differ in.
type addrFamily struct {
	table nftables.TableFamily
	// nfproto goes in the element messages' nfgenmsg.
	nfproto uint8
	addr    nftables.SetDatatype
	// Where the addresses lie in the network header, and their size.
	saddr, daddr, addrLen uint32
	// addrCsum: the IPv4 header's checksum (0: none, IPv6).
	addrCsum uint32
}

var addrFamilies = [2]addrFamily{
	{nftables.TableFamilyIPv4, unix.NFPROTO_IPV4, nftables.TypeIPAddr, 12, 16, 4, 10},
	{nftables.TableFamilyIPv6, unix.NFPROTO_IPV6, nftables.TypeIP6Addr, 8, 24, 16, 0},
}

func familyOf(a netip.Addr) addrFamily {
	if a.Is4() {
		return addrFamilies[0]
	}
	return addrFamilies[1]
}

// keyLen is the size of a key, or a map's value: the four fields, each in
// 32-bit registers of its own, ports zero-padded.
func (af addrFamily) keyLen() int { return int(2*af.addrLen + 8) }

// keyRegs are a key's registers, from NFT_REG32_00: source address, source
// port, destination address, destination port.
func (af addrFamily) keyRegs() (saddr, sport, daddr, dport uint32) {
	saddr = unix.NFT_REG32_00
	sport = saddr + af.addrLen/4
	daddr = sport + 1
	return saddr, sport, daddr, daddr + af.addrLen/4
}

// The headers a rule's payload expressions address.
const (
	nh = expr.PayloadBaseNetworkHeader
	th = expr.PayloadBaseTransportHeader
)

// load puts n bytes at off in base's header into reg.
func load(reg uint32, base expr.PayloadBase, off, n uint32) expr.Any {
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: base, Offset: off, Len: n}
}

func installFamilies(oifname [unix.IFNAMSIZ]byte, afs ...addrFamily) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	for _, af := range afs {
		if err := af.install(c, oifname); err != nil {
			return err
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables tables: %w", err)
	}
	return nil
}

// install queues af's table, sets, chain and rules on c.
func (af addrFamily) install(c *nftables.Conn, oifname [unix.IFNAMSIZ]byte) error {
	table := &nftables.Table{Family: af.table, Name: tableName}
	// A table left by an earlier helper in this namespace goes first.
	// Only then: a delete in the transaction makes its commit wait for
	// RCU (10-25 ms against 2 on the development VM, at every start).
	if _, err := c.ListTableOfFamily(tableName, af.table); err == nil {
		c.DelTable(table)
	}
	c.AddTable(table)
	tuple := nftables.MustConcatSetType(af.addr, nftables.TypeInetService, af.addr, nftables.TypeInetService)
	sets := make(map[string]*nftables.Set)
	for _, s := range []*nftables.Set{
		{Name: outMap, IsMap: true, DataType: tuple},
		{Name: backMap, IsMap: true, DataType: tuple},
		// No timeout: a flow that left it would cross the TAP
		// again, where the namespace's conntrack (notrack kept it
		// out meanwhile) could find its segments out of window.
		{Name: localSet, Dynamic: true},
	} {
		s.Table, s.Concatenation, s.KeyType, s.Size = table, true, tuple, mapSize
		if err := c.AddSet(s, nil); err != nil {
			return fmt.Errorf("nftables set %s: %w", s.Name, err)
		}
		sets[s.Name] = s
	}
	chain := c.AddChain(&nftables.Chain{Table: table, Name: chainName, Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRaw})
	for _, exprs := range af.rules(oifname, sets[outMap], sets[backMap], sets[localSet]) {
		c.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: exprs})
	}
	return nil
}

// rules: for a TCP segment whose (saddr, sport, daddr, dport) is in a map,
// write the map's tuple over those four fields, and keep conntrack out: it
// would see each direction as a separate, invalid connection. A chain of
// type route routes the segment again when its addresses changed, here to
// the namespace's loopback. A SYN alone is left as it is: it opens a
// connection, and the helper must see every one (a connection may reuse
// the addresses of one whose entries linger).
//
// Checksums: the new addresses are the old ones swapped (the fake address
// is the remote's, the listener's the guest's), which leaves every sum
// alone; the IPv4 writes still update the header and pseudo-header sums,
// which then do not change. The port writes update the TCP checksum, except
// in an offloaded segment's partial checksum, which the kernel leaves alone
// (it does not cover the ports).
//
// The output hook sees only the namespace's own sockets: the guest side of
// a connection the namespace forwards (a masqueraded container behind it,
// as in podman's rootless network namespace) never passes the first rule,
// and its answers must not be translated here either, but cross the TAP
// and come back in, where conntrack undoes the masquerade. So the first
// rule puts the listener-side key of each flow it translates in localSet,
// and the second translates only keys found there.
func (af addrFamily) rules(oifname [unix.IFNAMSIZ]byte, out, back, local *nftables.Set) [][]expr.Any {
	const tcpCsum, tcpFlags = 16, 13
	const syn, synAck = 0x02, 0x12
	rSaddr, rSport, rDaddr, rDport := af.keyRegs()
	storeAddr := func(reg, off uint32) expr.Any {
		p := &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: nh, Offset: off, Len: af.addrLen}
		if af.addrCsum != 0 {
			p.CsumType, p.CsumOffset, p.CsumFlags = expr.CsumTypeInet, af.addrCsum, unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR
		}
		return p
	}
	storePort := func(reg, off uint32) expr.Any {
		return &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: th, Offset: off, Len: 2,
			CsumType: expr.CsumTypeInet, CsumOffset: tcpCsum}
	}
	// loadKey: a TCP segment other than a bare SYN, routed out of the
	// TAP (so the helper, and whoever holds the netlink socket, can only
	// take connections that were theirs anyway), its key in the
	// registers from NFT_REG32_00 on.
	loadKey := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: oifname[:]},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		load(1, th, tcpFlags, 1),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{synAck}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{syn}},
		load(rSaddr, nh, af.saddr, af.addrLen),
		load(rSport, th, 0, 2),
		load(rDaddr, nh, af.daddr, af.addrLen),
		load(rDport, th, 2, 2),
	}
	translate := func(m *nftables.Set) []expr.Any {
		return []expr.Any{
			&expr.Lookup{SourceRegister: rSaddr, DestRegister: rSaddr, IsDestRegSet: true, SetName: m.Name, SetID: m.ID},
			storeAddr(rSaddr, af.saddr),
			storePort(rSport, 0),
			storeAddr(rDaddr, af.daddr),
			storePort(rDport, 2),
			&expr.Notrack{},
		}
	}
	outRule := append(append(append([]expr.Any(nil), loadKey...), translate(out)...),
		// The listener-side key is the rewritten segment's, reversed.
		load(rSaddr, nh, af.daddr, af.addrLen),
		load(rSport, th, 2, 2),
		load(rDaddr, nh, af.saddr, af.addrLen),
		load(rDport, th, 0, 2),
		&expr.Dynset{SrcRegKey: rSaddr, SetName: local.Name, SetID: local.ID, Operation: unix.NFT_DYNSET_OP_ADD},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)
	backRule := append(append(append([]expr.Any(nil), loadKey...),
		&expr.Lookup{SourceRegister: rSaddr, SetName: local.Name, SetID: local.ID}),
		translate(back)...)
	return [][]expr.Any{outRule, backRule}
}
