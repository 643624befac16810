// Package ktcpnat moves the kernel TCP path's address translation into the
// guest's own kernel, for IPv4.
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
package ktcpnat

import (
	"fmt"
	"os"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

const (
	tableName = "netns_run_tcp"
	mapName   = "flows"
	// mapSize bounds the map; a flow past it keeps the TAP path.
	mapSize = 65536
)

// Install creates the table in the calling thread's network namespace and
// returns a netlink socket of that namespace for Map. Every thread of the
// process must be in the namespace (the launcher's child joins it before
// the Go runtime starts).
func Install() (*os.File, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	defer c.CloseLasting()
	// A table left by an earlier helper in this namespace goes first
	// (adding it before deleting it makes the delete always succeed).
	table := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: tableName}
	c.AddTable(table)
	c.DelTable(table)
	c.AddTable(table)
	tuple := nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeIPAddr, nftables.TypeInetService)
	flows := &nftables.Set{Table: table, Name: mapName, IsMap: true, Concatenation: true,
		KeyType: tuple, DataType: tuple, Size: mapSize}
	if err := c.AddSet(flows, nil); err != nil {
		return nil, fmt.Errorf("nftables map: %w", err)
	}
	chain := c.AddChain(&nftables.Chain{Table: table, Name: "out", Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRaw})
	c.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: rewriteRule(flows)})
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("nftables table: %w", err)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	// A stuck kernel must not hang a flow: see Map.roundTrip.
	tv := unix.NsecToTimeval(time.Second.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	return os.NewFile(uintptr(fd), "nftables"), nil
}

// Registers: the key is loaded into the four 32-bit registers that make up
// NFT_REG_1, and the map's value replaces it there.
const (
	regSaddr = unix.NFT_REG32_00 + iota
	regSport
	regDaddr
	regDport
)

// rewriteRule: for a TCP segment whose (saddr, sport, daddr, dport) is in
// the map, write the map's tuple over those four fields (the IP and TCP
// checksums updated, partial checksums of offloaded segments too), and keep
// conntrack out: it would see each direction as a separate, invalid
// connection. A chain of type route routes the segment again when its
// addresses changed, here to the namespace's loopback. A SYN alone is left
// as it is: it opens a connection, and the helper must see every one (a
// connection may reuse the addresses of one whose entries linger).
func rewriteRule(flows *nftables.Set) []expr.Any {
	const ipSaddr, ipDaddr, ipCsum, tcpCsum, tcpFlags = 12, 16, 10, 16, 13
	const syn, synAck = 0x02, 0x12
	load := func(reg uint32, base expr.PayloadBase, off, n uint32) expr.Any {
		return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: base, Offset: off, Len: n}
	}
	store := func(reg uint32, base expr.PayloadBase, off, n, csum, flags uint32) expr.Any {
		return &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: base, Offset: off, Len: n,
			CsumType: expr.CsumTypeInet, CsumOffset: csum, CsumFlags: flags}
	}
	net, tr := expr.PayloadBaseNetworkHeader, expr.PayloadBaseTransportHeader
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		load(1, tr, tcpFlags, 1),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{synAck}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{syn}},
		load(regSaddr, net, ipSaddr, 4),
		load(regSport, tr, 0, 2),
		load(regDaddr, net, ipDaddr, 4),
		load(regDport, tr, 2, 2),
		&expr.Lookup{SourceRegister: regSaddr, DestRegister: regSaddr, IsDestRegSet: true, SetName: flows.Name, SetID: flows.ID},
		store(regSaddr, net, ipSaddr, 4, ipCsum, unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR),
		store(regSport, tr, 0, 2, tcpCsum, 0),
		store(regDaddr, net, ipDaddr, 4, ipCsum, unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR),
		store(regDport, tr, 2, 2, tcpCsum, 0),
		&expr.Notrack{},
	}
}
