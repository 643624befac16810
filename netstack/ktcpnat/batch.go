package ktcpnat

import (
	"encoding/binary"
	"net/netip"

	"github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// batch encodes one nftables transaction that adds (with their values) or
// removes es: a batch begin numbered first, one acknowledged element
// message per entry, a batch end numbered last. google/nftables encodes
// the same messages but only sends them over a socket it makes itself, in
// the caller's namespace; the helper is not in the guest's.
func batch(first uint32, nfproto uint8, msgType, flags uint16, es []entry) (msg []byte, last uint32, err error) {
	seq := first
	msg = appendMessage(msg, unix.NFNL_MSG_BATCH_BEGIN, unix.NLM_F_REQUEST, seq, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES, nil)
	for _, e := range es {
		ae := netlink.NewAttributeEncoder()
		ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, tableName)
		ae.String(unix.NFTA_SET_ELEM_LIST_SET, e.set)
		ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(ae *netlink.AttributeEncoder) error {
			ae.Nested(unix.NFTA_LIST_ELEM, func(ae *netlink.AttributeEncoder) error {
				ae.Nested(unix.NFTA_SET_ELEM_KEY, func(ae *netlink.AttributeEncoder) error {
					ae.Bytes(unix.NFTA_DATA_VALUE, e.key)
					return nil
				})
				if msgType == unix.NFT_MSG_NEWSETELEM {
					ae.Nested(unix.NFTA_SET_ELEM_DATA, func(ae *netlink.AttributeEncoder) error {
						ae.Bytes(unix.NFTA_DATA_VALUE, e.value)
						return nil
					})
				}
				return nil
			})
			return nil
		})
		attrs, err := ae.Encode()
		if err != nil {
			return nil, 0, err
		}
		seq++
		msg = appendMessage(msg, unix.NFNL_SUBSYS_NFTABLES<<8|msgType, unix.NLM_F_REQUEST|unix.NLM_F_ACK|flags, seq, nfproto, 0, attrs)
	}
	seq++
	msg = appendMessage(msg, unix.NFNL_MSG_BATCH_END, unix.NLM_F_REQUEST, seq, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES, nil)
	return msg, seq, nil
}

// conntrackDelete encodes a conntrack request (not batched) that deletes
// the entry whose original direction is the TCP connection from src to dst.
func conntrackDelete(seq uint32, src, dst netip.AddrPort) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(nl.CTA_TUPLE_ORIG, func(ae *netlink.AttributeEncoder) error {
		ae.Nested(nl.CTA_TUPLE_IP, func(ae *netlink.AttributeEncoder) error {
			if src.Addr().Is4() {
				ae.Bytes(nl.CTA_IP_V4_SRC, src.Addr().AsSlice())
				ae.Bytes(nl.CTA_IP_V4_DST, dst.Addr().AsSlice())
			} else {
				ae.Bytes(nl.CTA_IP_V6_SRC, src.Addr().AsSlice())
				ae.Bytes(nl.CTA_IP_V6_DST, dst.Addr().AsSlice())
			}
			return nil
		})
		ae.Nested(nl.CTA_TUPLE_PROTO, func(ae *netlink.AttributeEncoder) error {
			ae.Uint8(nl.CTA_PROTO_NUM, unix.IPPROTO_TCP)
			ae.Bytes(nl.CTA_PROTO_SRC_PORT, binary.BigEndian.AppendUint16(nil, src.Port()))
			ae.Bytes(nl.CTA_PROTO_DST_PORT, binary.BigEndian.AppendUint16(nil, dst.Port()))
			return nil
		})
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	family := uint8(unix.AF_INET)
	if !src.Addr().Is4() {
		family = unix.AF_INET6
	}
	return appendMessage(nil, unix.NFNL_SUBSYS_CTNETLINK<<8|nl.IPCTNL_MSG_CT_DELETE, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq, family, 0, attrs), nil
}

// appendMessage appends a netlink header, an nfgenmsg and attrs.
func appendMessage(b []byte, typ, flags uint16, seq uint32, family uint8, resID uint16, attrs []byte) []byte {
	const nfgenLen = 4
	n := unix.NLMSG_HDRLEN + nfgenLen + len(attrs)
	b = binary.NativeEndian.AppendUint32(b, uint32(n))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port: the kernel's
	b = append(b, family, unix.NFNETLINK_V0)
	b = binary.BigEndian.AppendUint16(b, resID)
	b = append(b, attrs...)
	for len(b)%unix.NLMSG_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}
