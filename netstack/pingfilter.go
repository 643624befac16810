package netstack

import (
	"fmt"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// A raw ICMP socket receives every ICMP packet that reaches the host: other
// processes' echo replies, echo requests to the host, redirects. Each raw
// ping flow filters its socket down to its own replies and the errors
// quoting its own requests, so that it wakes (and the guest's flow lives)
// only for what concerns it.

// From include/uapi/linux/icmp.h and icmpv6.h; x/sys/unix lacks them.
const (
	icmpFilter   = 1 // ICMP_FILTER, level SOL_RAW: a mask of types to drop
	icmpv6Filter = 1 // ICMPV6_FILTER, level IPPROTO_ICMPV6: struct icmp6_filter
)

// pingErrorQuoteLen is where the identifier of our own echo request sits in
// an ICMP error quoting it: after the error's 8 header bytes, the quoted IP
// header (20 bytes: we send no IPv4 options; 40 for IPv6) and 4 bytes of the
// quoted echo header.
const (
	pingErrorIdent4 = 8 + header.IPv4MinimumSize + 4
	pingErrorIdent6 = 8 + header.IPv6MinimumSize + 4
)

// filterRaw restricts a raw ICMP socket to echo replies and errors that
// carry ident, by type (ICMP_FILTER, ICMPV6_FILTER) and identifier (BPF).
func filterRaw(fd int, v6 bool, ident uint16) error {
	var prog []unix.SockFilter
	if v6 {
		f := unix.ICMPv6Filter{}
		for i := range f.Data {
			f.Data[i] = ^uint32(0)
		}
		for _, t := range []header.ICMPv6Type{header.ICMPv6EchoReply, header.ICMPv6DstUnreachable, header.ICMPv6PacketTooBig, header.ICMPv6TimeExceeded} {
			f.Data[t>>5] &^= 1 << (t & 31)
		}
		if err := unix.SetsockoptICMPv6Filter(fd, unix.IPPROTO_ICMPV6, icmpv6Filter, &f); err != nil {
			return fmt.Errorf("ICMPV6_FILTER: %w", err)
		}
		// An ICMPv6 raw socket's filter sees the packet from the
		// ICMPv6 header on.
		prog = []unix.SockFilter{
			{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 0},
			{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: uint32(header.ICMPv6EchoReply), Jt: 0, Jf: 2},
			{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_ABS, K: 4},
			{Code: unix.BPF_JMP | unix.BPF_JA, K: 1},
			{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_ABS, K: pingErrorIdent6},
			{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: uint32(ident), Jt: 0, Jf: 1},
			{Code: unix.BPF_RET | unix.BPF_K, K: 1 << 18},
			{Code: unix.BPF_RET | unix.BPF_K, K: 0},
		}
	} else {
		mask := ^uint32(1<<header.ICMPv4EchoReply | 1<<header.ICMPv4DstUnreachable | 1<<header.ICMPv4TimeExceeded)
		if err := unix.SetsockoptInt(fd, unix.SOL_RAW, icmpFilter, int(int32(mask))); err != nil {
			return fmt.Errorf("ICMP_FILTER: %w", err)
		}
		// An IPv4 raw socket's filter sees the IP header first.
		prog = []unix.SockFilter{
			{Code: unix.BPF_LDX | unix.BPF_B | unix.BPF_MSH, K: 0},
			{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_IND, K: 0},
			{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: uint32(header.ICMPv4EchoReply), Jt: 0, Jf: 2},
			{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_IND, K: 4},
			{Code: unix.BPF_JMP | unix.BPF_JA, K: 1},
			{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_IND, K: pingErrorIdent4},
			{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: uint32(ident), Jt: 0, Jf: 1},
			{Code: unix.BPF_RET | unix.BPF_K, K: 1 << 18},
			{Code: unix.BPF_RET | unix.BPF_K, K: 0},
		}
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}); err != nil {
		return fmt.Errorf("SO_ATTACH_FILTER: %w", err)
	}
	return nil
}
