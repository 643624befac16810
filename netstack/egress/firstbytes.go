package egress

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strings"
)

// What a TCP flow's first bytes say about the name it is for.

type firstKind uint8

const (
	firstUnknown firstKind = iota // too few bytes to tell
	firstTLS                      // a TLS handshake record
	firstHTTP                     // an HTTP/1 request
	firstOther                    // anything else
)

func (k firstKind) String() string {
	return [...]string{"unknown", "tls", "http", "other"}[k]
}

// MaxFirstBytes is the most a caller needs to gather before the first
// bytes are decided: a ClientHello fits in one 16 KiB record (with
// post-quantum key shares it is about 2 KiB), request headers in 16 KiB.
const MaxFirstBytes = 16<<10 + 5

// maxHTTPHeader bounds an HTTP request's head.
const maxHTTPHeader = 16 << 10

// firstBytes is what parseFirstBytes found.
type firstBytes struct {
	kind firstKind
	// complete: the ClientHello or the request head is all there.
	complete bool
	// name is the TLS server name or the HTTP host ("" if none).
	name string
	// bad says why the message cannot be checked (malformed, two
	// different hosts).
	bad string
}

// parseFirstBytes looks at what a client sent first.
func parseFirstBytes(b []byte) firstBytes {
	switch {
	case len(b) == 0:
		return firstBytes{}
	case b[0] == 0x16:
		return parseClientHello(b)
	}
	// Servers skip empty lines before a request line (RFC 9112 2.2):
	// so must the check, or "\r\nGET" would pass as another protocol.
	req := bytes.TrimLeft(b, "\r\n")
	switch requestLine(req) {
	case firstUnknown:
		if len(b) >= MaxFirstBytes {
			return firstBytes{kind: firstOther, complete: true}
		}
		return firstBytes{}
	case firstHTTP:
		return parseHTTPHead(req)
	}
	return firstBytes{kind: firstOther, complete: true}
}

// parseClientHello reads a TLS ClientHello, possibly split over several
// handshake records, and its server_name extension.
func parseClientHello(b []byte) firstBytes {
	f := firstBytes{kind: firstTLS}
	var hs []byte
	for len(b) > 0 {
		if len(b) < 5 {
			return f
		}
		if b[0] != 0x16 || b[1] != 3 {
			f.complete, f.bad = true, "not a TLS handshake record"
			return f
		}
		n := int(binary.BigEndian.Uint16(b[3:]))
		if n == 0 || n > 1<<14+2048 {
			f.complete, f.bad = true, "bad TLS record length"
			return f
		}
		if len(b) < 5+n {
			return f
		}
		hs = append(hs, b[5:5+n]...)
		b = b[5+n:]
		if len(hs) >= 4 {
			if hs[0] != 1 {
				f.complete, f.bad = true, "TLS handshake is not a ClientHello"
				return f
			}
			if need := 4 + (int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])); len(hs) >= need {
				return parseHelloBody(hs[4:need], f)
			}
		}
	}
	return f
}

// parseHelloBody finds the server name in a ClientHello's body.
func parseHelloBody(h []byte, f firstBytes) firstBytes {
	f.complete = true
	r := reader{b: h}
	r.skip(2 + 32) // version, random
	r.skip(int(r.u8()))
	r.skip(int(r.u16()))
	r.skip(int(r.u8()))
	if r.bad {
		f.bad = "malformed ClientHello"
		return f
	}
	if r.empty() {
		return f // no extensions: no server name
	}
	exts := reader{b: r.bytes(int(r.u16()))}
	for !exts.empty() && !exts.bad {
		typ := exts.u16()
		data := exts.bytes(int(exts.u16()))
		if typ != 0 || exts.bad {
			continue
		}
		if f.name != "" {
			f.bad = "two server_name extensions"
			return f
		}
		list := reader{b: data}
		names := reader{b: list.bytes(int(list.u16()))}
		for !names.empty() && !names.bad {
			kind := names.u8()
			name := names.bytes(int(names.u16()))
			if kind == 0 && !names.bad {
				if f.name != "" {
					f.bad = "two host names in server_name"
					return f
				}
				f.name = string(name)
			}
		}
		if list.bad || names.bad {
			f.bad = "malformed server_name extension"
			return f
		}
	}
	if exts.bad {
		f.bad = "malformed ClientHello extensions"
	}
	return f
}

// reader reads big-endian fields, remembering an overrun.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) empty() bool { return len(r.b) == 0 }

func (r *reader) bytes(n int) []byte {
	if r.bad || n > len(r.b) {
		r.bad = true
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

func (r *reader) skip(n int) { r.bytes(n) }

func (r *reader) u8() uint8 {
	if b := r.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.bytes(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

// requestLine says whether b starts with an HTTP/1 request line: any
// method token (servers route WebDAV's and unknown methods by Host too),
// then a target, then "HTTP/". A line that is not whole yet, and could
// still be one, is firstUnknown. HTTP/0.9's "GET /" names no host, and
// reaches only the address's default site: it counts as another protocol.
func requestLine(b []byte) firstKind {
	i := 0
	for i < len(b) && isTokenChar(b[i]) {
		i++
	}
	switch {
	case i == len(b):
		return firstUnknown
	case i == 0 || b[i] != ' ':
		return firstOther
	}
	nl := bytes.IndexByte(b, '\n')
	if nl < 0 {
		return firstUnknown
	}
	f := strings.Fields(string(b[:nl]))
	if len(f) >= 3 && strings.HasPrefix(f[len(f)-1], "HTTP/") {
		return firstHTTP
	}
	return firstOther
}

// isTokenChar reports whether c may be part of an RFC 9110 token.
func isTokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// parseHTTPHead reads the request line and the Host header. A request
// that names its host twice (an absolute target and Host, or two Host
// headers) must name the same one, or servers might pick either. Lines end
// at LF, with or without CR before it, as servers read them.
func parseHTTPHead(b []byte) firstBytes {
	f := firstBytes{kind: firstHTTP}
	var lines []string
	for rest, done := string(b), false; !done; {
		line, after, ok := strings.Cut(rest, "\n")
		if !ok {
			if len(b) >= maxHTTPHeader {
				f.complete, f.bad = true, "HTTP request head too large"
			}
			return f
		}
		line = strings.TrimSuffix(line, "\r")
		done, rest = line == "", after
		if !done {
			lines = append(lines, line)
		}
	}
	f.complete = true
	parts := strings.Fields(lines[0])
	if len(parts) != 3 || !strings.HasPrefix(parts[2], "HTTP/") {
		f.bad = "malformed HTTP request line"
		return f
	}
	var hosts []string
	method, target := parts[0], parts[1]
	switch {
	case method == "CONNECT":
		hosts = append(hosts, target)
	case strings.Contains(target, "://"):
		_, rest, _ := strings.Cut(target, "://")
		authority, _, _ := strings.Cut(rest, "/")
		hosts = append(hosts, authority)
	}
	for _, l := range lines[1:] {
		if l[0] == ' ' || l[0] == '\t' {
			// A folded line (obsolete): servers that still take it
			// would add it to the header before, perhaps Host.
			f.bad = "folded HTTP header line"
			return f
		}
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.EqualFold(strings.TrimSpace(k), "host") {
			hosts = append(hosts, strings.TrimSpace(v))
		}
	}
	for _, h := range hosts {
		name := hostOfAuthority(h)
		if f.name != "" && name != f.name {
			f.bad = "the request names two different hosts"
			return f
		}
		f.name = name
	}
	return f
}

// hostOfAuthority strips userinfo and port from host[:port]; an IP literal
// is returned as it is written (it is no name, and no name rule matches it).
func hostOfAuthority(a string) string {
	if i := strings.LastIndexByte(a, '@'); i >= 0 {
		a = a[i+1:]
	}
	if strings.HasPrefix(a, "[") {
		return a
	}
	if h, port, ok := strings.Cut(a, ":"); ok && port != "" {
		return h
	}
	return strings.TrimSuffix(a, ":")
}

// normalName lower-cases a name and drops its trailing dot.
func normalName(s string) string {
	return strings.TrimSuffix(strings.ToLower(s), ".")
}

// isAddress reports whether a host name is an IP literal.
func isAddress(s string) bool {
	_, err := netip.ParseAddr(strings.Trim(s, "[]"))
	return err == nil
}
