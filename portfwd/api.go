package portfwd

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// The API speaks slirp4netns's protocol byte for byte: one JSON request per
// connection, read until it is whole or EOF (at most 4095 bytes), one
// compact JSON reply in a single write, then close. Runtimes (podman,
// rootlesskit) depend on the exact shapes, including list_hostfwd's reply
// having no "return" wrapper.
const (
	apiMaxRequest = 4096
	// apiReadTimeout bounds a client that never finishes its request.
	apiReadTimeout = 5 * time.Second
	// apiMaxClients bounds requests handled at once.
	apiMaxClients = 16
)

// API serves the port-forwarding API for a PortMap.
type API struct {
	ports *PortMap
	// defaultGuest is used when a request leaves guest_addr empty, and
	// defaultGuest6 then for IPv6 clients (see Rule.GuestAddr6).
	defaultGuest, defaultGuest6 netip.Addr
	log                         *slog.Logger
	allowIPv6                   bool
	info, stats                 func() any
	egress                      Egress
	// guest, if set, says whose requests are refused (see RefuseGuest).
	guest *guestFilter
}

// Egress is the runtime control of the egress policy behind the API's
// get_egress_policy, add_egress_rule and remove_egress_rule.
type Egress interface {
	EgressPolicy() (any, error)
	AddEgressRule(verdict, rule string) (int, error)
	RemoveEgressRule(id int) error
}

// SetEgress enables the egress policy commands (extensions, like
// get_stats).
func (a *API) SetEgress(e Egress) { a.egress = e }

// RefuseGuest makes the API refuse requests from processes in user
// namespace guest (the namespace whose network it configures) or one
// nested in it: a guest that opens host ports for itself undoes
// --disable-host-loopback and every other limit set from outside.
//
// seesGuests says that this process may inspect every process in guest
// (it runs in an ancestor namespace as guest's owner, with its
// capabilities: netns-run, usernet without --enable-sandbox); a caller
// the kernel does not let it inspect (another user, root) is then served.
// Otherwise (usernet inside its sandbox, which may inspect hardly anyone)
// such a caller is served only if its socket is in our own network
// namespace, where no guest process can make one.
func (a *API) RefuseGuest(guest UserNS, seesGuests bool) {
	a.guest = &guestFilter{userNS: guest, seesGuests: seesGuests}
}

// SetReporter enables get_info and get_stats, our extensions to the
// protocol (unknown to slirp4netns clients, which never send them): info
// and stats return what the replies carry.
func (a *API) SetReporter(info, stats func() any) { a.info, a.stats = info, stats }

// AllowIPv6 lets requests name IPv6 host and guest addresses, an extension
// slirp4netns clients never use (its API is IPv4-only).
func (a *API) AllowIPv6() { a.allowIPv6 = true }

// SetDefaultGuest6 sends IPv6 clients of rules that name no guest address
// to addr, the guest's IPv6 address.
func (a *API) SetDefaultGuest6(addr netip.Addr) { a.defaultGuest6 = addr }

// NewAPI returns an API editing ports; defaultGuest is the guest address
// used when a request names none (net+100 in slirp4netns).
func NewAPI(ports *PortMap, defaultGuest netip.Addr, log *slog.Logger) *API {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &API{ports: ports, defaultGuest: defaultGuest, log: log}
}

// Serve answers requests on ln until ctx ends or ln is closed, then waits
// for requests in progress.
func (a *API) Serve(ctx context.Context, ln net.Listener) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, apiMaxClients)
	ownNetns := netnsCookie(ln)
	var backoff sockrelay.AcceptBackoff
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil && backoff.Wait(err) {
				a.log.Debug("api: accept", "err", err)
				continue
			}
			return
		}
		backoff.Reset()
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			a.serveConn(conn, ownNetns)
		}()
	}
}

// serveConn answers one connection; ownNetns is the cookie of our network
// namespace (0: unknown).
func (a *API) serveConn(conn net.Conn, ownNetns uint64) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(apiReadTimeout))
	var refused error
	if a.guest != nil {
		// Answered after reading the request: a client gets the answer
		// instead of a reset from a socket closed on its unread request.
		refused = a.guest.check(conn, ownNetns)
	}
	req, err := readRequest(conn)
	var resp []byte
	switch {
	case refused != nil:
		a.log.Warn("api: request refused", "err", refused)
		resp = apiError("permission denied: " + refused.Error())
	case err != nil:
		a.log.Debug("api: reading request", "err", err)
		resp = apiError("bad request: cannot parse JSON")
	case len(req) >= apiMaxRequest:
		resp = apiError("bad request: too large message")
	default:
		a.log.Debug("api: request", "body", string(req))
		resp = a.Handle(req)
	}
	_, _ = conn.Write(resp)
}

// readRequest reads a request until it is one whole JSON value, the client
// shut its side, or it is apiMaxRequest bytes long. slirp4netns answers
// what one read gave it, so its clients need not shut their side: a client
// that writes and then waits for the answer must get it.
func readRequest(conn net.Conn) ([]byte, error) {
	buf := make([]byte, apiMaxRequest)
	n := 0
	for n < len(buf) {
		m, err := conn.Read(buf[n:])
		n += m
		switch {
		case errors.Is(err, io.EOF):
			return buf[:n], nil
		case err != nil:
			return buf[:n], err
		case m > 0 && json.Valid(buf[:n]):
			return buf[:n], nil
		}
	}
	return buf, nil
}

// Handle answers one request with slirp4netns's exact reply bytes.
func (a *API) Handle(req []byte) []byte {
	var v any
	if err := json.Unmarshal(req, &v); err != nil {
		return apiError("bad request: cannot parse JSON")
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return apiError("bad request: json_object() failed")
	}
	exec, ok := obj["execute"].(string)
	if !ok {
		return apiError("bad request: no execute found")
	}
	args, _ := obj["arguments"].(map[string]any)
	switch exec {
	case "add_hostfwd":
		return a.add(args)
	case "list_hostfwd":
		return a.list()
	case "remove_hostfwd":
		return a.remove(args)
	case "get_info":
		if a.info != nil {
			return mustJSON(map[string]any{"return": map[string]any{"network": a.info(), "ports": a.entries()}})
		}
	case "get_stats":
		if a.stats != nil {
			return mustJSON(map[string]any{"return": a.stats()})
		}
	case "get_egress_policy", "add_egress_rule", "remove_egress_rule":
		if a.egress != nil {
			return a.egressCommand(exec, args)
		}
	}
	return apiError("bad request: unknown execute")
}

// egressCommand serves the egress policy commands:
//
//	{"execute":"get_egress_policy"}
//	{"execute":"add_egress_rule","arguments":{"verdict":"allow","rule":"github.com:443"}} -> {"return":{"id":N}}
//	{"execute":"remove_egress_rule","arguments":{"id":N}}
func (a *API) egressCommand(exec string, args map[string]any) []byte {
	prefix := "bad request: " + exec + ": "
	switch exec {
	case "get_egress_policy":
		v, err := a.egress.EgressPolicy()
		if err != nil {
			return apiError(exec + ": " + err.Error())
		}
		return mustJSON(map[string]any{"return": v})
	case "add_egress_rule":
		verdict, _ := args["verdict"].(string)
		rule, _ := args["rule"].(string)
		if verdict == "" || rule == "" {
			return apiError(prefix + "want arguments.verdict (allow or deny) and arguments.rule")
		}
		id, err := a.egress.AddEgressRule(verdict, rule)
		if err != nil {
			return apiError(prefix + err.Error())
		}
		a.log.Info("api: egress rule added", "id", id, "verdict", verdict, "rule", rule)
		return mustJSON(map[string]any{"return": map[string]int{"id": id}})
	default:
		n, _ := args["id"].(float64)
		if n < 1 || n > math.MaxInt32 || n != math.Trunc(n) {
			return apiError(prefix + "bad arguments.id")
		}
		if err := a.egress.RemoveEgressRule(int(n)); err != nil {
			return apiError(prefix + err.Error())
		}
		a.log.Info("api: egress rule removed", "id", int(n))
		return []byte(`{"return":{}}`)
	}
}

func (a *API) add(args map[string]any) []byte {
	const prefix = "bad request: add_hostfwd: "
	proto, _ := args["proto"].(string)
	if proto != "tcp" && proto != "udp" {
		return apiError(prefix + "bad arguments.proto")
	}
	hostAddr, ok := a.addrArg(args, "host_addr", netip.IPv4Unspecified())
	if !ok {
		return apiError(prefix + "bad arguments.host_addr")
	}
	hostPort, ok := portArg(args, "host_port")
	if !ok {
		return apiError(prefix + "bad arguments.host_port")
	}
	guestAddr, ok := a.addrArg(args, "guest_addr", a.defaultGuest)
	if !ok {
		return apiError(prefix + "bad arguments.guest_addr")
	}
	guestPort, ok := portArg(args, "guest_port")
	if !ok {
		return apiError(prefix + "bad arguments.guest_port")
	}
	r := Rule{Proto: proto, HostAddr: hostAddr, HostPort: hostPort, GuestAddr: guestAddr, GuestPort: guestPort}
	if s, _ := args["guest_addr"].(string); s == "" {
		r.GuestAddr6 = a.defaultGuest6
	}
	id, err := a.ports.Add(r)
	if err != nil {
		a.log.Warn("api: add_hostfwd", "err", err)
		return apiError(prefix + "slirp_add_hostfwd failed")
	}
	return mustJSON(map[string]any{"return": map[string]int{"id": id}})
}

// apiEntry fixes the key order of list_hostfwd entries.
type apiEntry struct {
	ID        int    `json:"id"`
	Proto     string `json:"proto"`
	HostAddr  string `json:"host_addr"`
	HostPort  uint16 `json:"host_port"`
	GuestAddr string `json:"guest_addr"`
	GuestPort uint16 `json:"guest_port"`
}

func (a *API) list() []byte {
	return mustJSON(struct {
		Entries []apiEntry `json:"entries"`
	}{a.entries()})
}

func (a *API) entries() []apiEntry {
	entries := []apiEntry{}
	for _, e := range a.ports.List() {
		host := "::" // a dual-stack rule from netns-run -p
		if e.HostAddr.IsValid() {
			host = e.HostAddr.String()
		}
		entries = append(entries, apiEntry{e.ID, e.Proto, host, e.HostPort, e.GuestAddr.String(), e.GuestPort})
	}
	return entries
}

func (a *API) remove(args map[string]any) []byte {
	const prefix = "bad request: remove_hostfwd: "
	n, _ := args["id"].(float64)
	if n < 1 || n > math.MaxInt32 || a.ports.Remove(int(n)) != nil {
		return apiError(prefix + "bad arguments.id")
	}
	return []byte(`{"return":{}}`)
}

// addrArg reads an address argument; absent, empty or not a string means
// def, as in slirp4netns.
func (a *API) addrArg(args map[string]any, key string, def netip.Addr) (netip.Addr, bool) {
	s, _ := args[key].(string)
	if s == "" {
		return def, true
	}
	addr, err := netip.ParseAddr(s)
	if err != nil || addr.Zone() != "" || (!addr.Is4() && !a.allowIPv6) {
		return netip.Addr{}, false
	}
	return addr, true
}

// portArg reads a port number; fractions are truncated like the C cast.
func portArg(args map[string]any, key string) (uint16, bool) {
	n, ok := args[key].(float64)
	if !ok || n < 1 || n >= 65536 {
		return 0, false
	}
	return uint16(n), true
}

func apiError(desc string) []byte {
	return mustJSON(map[string]any{"error": map[string]string{"desc": desc}})
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only fixed, marshalable shapes get here.
		return []byte(`{"error":{"desc":"internal error"}}`)
	}
	return b
}
