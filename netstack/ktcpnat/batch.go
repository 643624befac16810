package ktcpnat

import (
	"encoding/binary"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// batch encodes one nftables transaction that adds (withData) or removes
// rw's map entries: a batch begin, the element message (numbered seq+1,
// acknowledged), a batch end. google/nftables encodes the same messages but
// only sends them over a socket it makes itself, in the caller's
// namespace; the helper is not in the guest's.
func batch(seq uint32, msgType, flags uint16, rw []Rewrite, withData bool) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, tableName)
	ae.String(unix.NFTA_SET_ELEM_LIST_SET, mapName)
	ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(ae *netlink.AttributeEncoder) error {
		for _, r := range rw {
			ae.Nested(unix.NFTA_LIST_ELEM, func(ae *netlink.AttributeEncoder) error {
				ae.Nested(unix.NFTA_SET_ELEM_KEY, func(ae *netlink.AttributeEncoder) error {
					ae.Bytes(unix.NFTA_DATA_VALUE, r.From.key())
					return nil
				})
				if withData {
					ae.Nested(unix.NFTA_SET_ELEM_DATA, func(ae *netlink.AttributeEncoder) error {
						ae.Bytes(unix.NFTA_DATA_VALUE, r.To.key())
						return nil
					})
				}
				return nil
			})
		}
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	var b []byte
	b = appendMessage(b, unix.NFNL_MSG_BATCH_BEGIN, unix.NLM_F_REQUEST, seq, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES, nil)
	b = appendMessage(b, unix.NFNL_SUBSYS_NFTABLES<<8|msgType, unix.NLM_F_REQUEST|unix.NLM_F_ACK|flags, seq+1, unix.NFPROTO_IPV4, 0, attrs)
	b = appendMessage(b, unix.NFNL_MSG_BATCH_END, unix.NLM_F_REQUEST, seq+2, unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES, nil)
	return b, nil
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
