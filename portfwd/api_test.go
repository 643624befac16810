package portfwd

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// nullGuest accepts forwards but never carries traffic: the API tests only
// look at bookkeeping and listeners.
type nullGuest struct{}

func (nullGuest) ForwardTCP(c *net.TCPConn, _ netip.AddrPort) error { c.Close(); return nil }
func (nullGuest) DialGuestUDP(_, _ netip.AddrPort) (net.Conn, error) {
	return nil, errors.New("no guest")
}

func newTestAPI(t *testing.T) *API {
	t.Helper()
	ports := New(nullGuest{}, nil)
	t.Cleanup(func() { ports.Close() })
	return NewAPI(ports, netip.MustParseAddr("10.0.2.100"), nil)
}

// freePort returns a loopback TCP and UDP port that is free right now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func TestAPIExactReplies(t *testing.T) {
	a := newTestAPI(t)
	p := itoa(freePort(t))
	steps := []struct{ req, want string }{
		{`{"execute":"list_hostfwd"}`, `{"entries":[]}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p + `,"guest_port":80}}` + "\n", `{"return":{"id":1}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"127.0.0.1","host_port":` + p + `.7,"guest_addr":"10.0.2.5","guest_port":81}}`, `{"return":{"id":2}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p + `,"guest_port":80}}`, `{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}`},
		{`{"execute":"list_hostfwd"}`, `{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p + `,"guest_addr":"10.0.2.100","guest_port":80},{"id":2,"proto":"udp","host_addr":"127.0.0.1","host_port":` + p + `,"guest_addr":"10.0.2.5","guest_port":81}]}`},
		{`{"execute":"remove_hostfwd","arguments":{"id":1}}`, `{"return":{}}`},
		{`{"execute":"remove_hostfwd","arguments":{"id":1}}`, `{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}`},
		{`{"execute":"remove_hostfwd"}`, `{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p + `,"guest_port":80}}`, `{"return":{"id":3}}`},
		{`badjson`, `{"error":{"desc":"bad request: cannot parse JSON"}}`},
		{`[1,2]`, `{"error":{"desc":"bad request: json_object() failed"}}`},
		{`{"x":1}`, `{"error":{"desc":"bad request: no execute found"}}`},
		{`{"execute":1}`, `{"error":{"desc":"bad request: no execute found"}}`},
		{`{"execute":"reboot"}`, `{"error":{"desc":"bad request: unknown execute"}}`},
		{`{"execute":"add_hostfwd"}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.proto"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"sctp","host_port":1,"guest_port":1}}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.proto"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"::1","host_port":1,"guest_port":1}}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.host_addr"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":"80","guest_port":1}}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.host_port"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":70000,"guest_port":1}}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.host_port"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_addr":"x","guest_port":1}}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.guest_addr"}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_port":0}}`, `{"error":{"desc":"bad request: add_hostfwd: bad arguments.guest_port"}}`},
	}
	for _, s := range steps {
		if got := string(a.Handle([]byte(s.req))); got != s.want {
			t.Errorf("%s\n got %s\nwant %s", s.req, got, s.want)
		}
	}
}

func TestAPIOverSocket(t *testing.T) {
	a := newTestAPI(t)
	path := t.TempDir() + "/api.sock"
	sock, err := ListenAPISocket(path)
	if err != nil {
		t.Fatal(err)
	}
	ln := sock.Listener
	done := make(chan struct{})
	go func() { defer close(done); a.Serve(t.Context(), ln) }()
	t.Cleanup(func() { sock.Close(); <-done })

	call := func(req string) string { return apiRequest(t, path, req) }
	if got := call(`{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
		t.Errorf("list: %q", got)
	}
	// As slirp4netns, answered once the request is whole: the client
	// need not shut its side first.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(`{"execute":"list_hostfwd"}`)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * apiReadTimeout))
	if got, err := io.ReadAll(c); string(got) != `{"entries":[]}` {
		t.Errorf("list without shutting the client's side: %q, %v", got, err)
	}
	big := `{"execute":"list_hostfwd","pad":"` + strings.Repeat("x", 5000) + `"}`
	if got := call(big); got != `{"error":{"desc":"bad request: too large message"}}` {
		t.Errorf("oversized: %q", got)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v, %v; want 0600", st.Mode(), err)
	}
	if _, err := ListenAPISocket(strings.Repeat("a", 120)); err == nil {
		t.Error("a 120-byte socket path was accepted")
	}
}

// FuzzAPIHandle: no request may panic, and every reply is one of the
// protocol's shapes.
func FuzzAPIHandle(f *testing.F) {
	for _, s := range []string{
		`{"execute":"list_hostfwd"}`,
		`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":1,"guest_port":1}}`,
		`{"execute":"remove_hostfwd","arguments":{"id":1e300}}`,
		`{"execute":"add_hostfwd","arguments":{"proto":"udp","host_port":-1,"guest_port":1.5}}`,
		`{"execute":"add_hostfwd","arguments":null}`,
		`[]`, `null`, `"x"`, `{`, ``,
	} {
		f.Add([]byte(s))
	}
	a := NewAPI(New(nullGuest{}, nil), netip.MustParseAddr("10.0.2.100"), nil)
	f.Fuzz(func(t *testing.T, req []byte) {
		got := string(a.Handle(req))
		if !strings.HasPrefix(got, `{"error":{"desc":"bad request: `) && !strings.HasPrefix(got, `{"return":`) && !strings.HasPrefix(got, `{"entries":[`) {
			t.Fatalf("reply %q to %q", got, req)
		}
		for _, e := range a.ports.List() {
			_ = a.ports.Remove(e.ID)
		}
	})
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestAPISlowClients: clients that connect and never finish their request
// time out; meanwhile a well-behaved client is still answered.
func TestAPISlowClients(t *testing.T) {
	a := newTestAPI(t)
	path := t.TempDir() + "/api.sock"
	sock, err := ListenAPISocket(path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); a.Serve(t.Context(), sock.Listener) }()
	t.Cleanup(func() { sock.Close(); <-done })

	// More idle clients than the API serves at once.
	for i := 0; i < apiMaxClients+4; i++ {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = c.Write([]byte(`{"execute":`)) // and nothing more
	}
	start := time.Now()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte(`{"execute":"list_hostfwd"}`))
	c.(*net.UnixConn).CloseWrite()
	_ = c.SetReadDeadline(time.Now().Add(3 * apiReadTimeout))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != `{"entries":[]}` {
		t.Fatalf("request behind slow clients: %q, %v", b, err)
	}
	if el := time.Since(start); el > 2*apiReadTimeout {
		t.Errorf("answered after %v; slow clients should have timed out after %v", el, apiReadTimeout)
	}
}

// fakeEgress records the egress commands the API passes on.
type fakeEgress struct {
	rules map[int]string
	next  int
}

func (f *fakeEgress) EgressPolicy() (any, error) { return map[string]any{"rules": len(f.rules)}, nil }

func (f *fakeEgress) AddEgressRule(verdict, rule string) (int, error) {
	if verdict != "allow" && verdict != "deny" {
		return 0, errors.New(`verdict "` + verdict + `": want allow or deny`)
	}
	f.next++
	f.rules[f.next] = verdict + " " + rule
	return f.next, nil
}

func (f *fakeEgress) RemoveEgressRule(id int) error {
	if _, ok := f.rules[id]; !ok {
		return errors.New("no rule with that id: " + itoa(id))
	}
	delete(f.rules, id)
	return nil
}

func TestAPIEgressCommands(t *testing.T) {
	a := newTestAPI(t)
	if got := string(a.Handle([]byte(`{"execute":"get_egress_policy"}`))); got != `{"error":{"desc":"bad request: unknown execute"}}` {
		t.Errorf("without a policy: %s", got)
	}
	e := &fakeEgress{rules: map[int]string{}}
	a.SetEgress(e)
	for _, s := range []struct{ req, want string }{
		{`{"execute":"add_egress_rule","arguments":{"verdict":"allow","rule":"github.com:443"}}`, `{"return":{"id":1}}`},
		{`{"execute":"get_egress_policy"}`, `{"return":{"rules":1}}`},
		{`{"execute":"add_egress_rule","arguments":{"verdict":"maybe","rule":"x"}}`, `{"error":{"desc":"bad request: add_egress_rule: verdict \"maybe\": want allow or deny"}}`},
		{`{"execute":"add_egress_rule","arguments":{"rule":"x"}}`, `{"error":{"desc":"bad request: add_egress_rule: want arguments.verdict (allow or deny) and arguments.rule"}}`},
		{`{"execute":"remove_egress_rule","arguments":{"id":1}}`, `{"return":{}}`},
		{`{"execute":"remove_egress_rule","arguments":{"id":1}}`, `{"error":{"desc":"bad request: remove_egress_rule: no rule with that id: 1"}}`},
		{`{"execute":"remove_egress_rule","arguments":{"id":1.5}}`, `{"error":{"desc":"bad request: remove_egress_rule: bad arguments.id"}}`},
	} {
		if got := string(a.Handle([]byte(s.req))); got != s.want {
			t.Errorf("%s:\n got %s\nwant %s", s.req, got, s.want)
		}
	}
}
