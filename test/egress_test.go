package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The egress policy, end to end: real names through the world's DNS
// server (which logs every query it receives), real servers on R.

const (
	egressOther  = "198.51.100.12" // a host no name of the tests' resolves to
	egressShared = "198.51.100.11" // two names on one address (a CDN)
	egressV6     = "2001:db8:2::11"
)

// egressWorld is the test world with the egress tests' names and servers.
type egressWorld struct {
	*world
	queryLog string
}

func newEgressWorld(t *testing.T) *egressWorld {
	t.Helper()
	wd := newWorld(t)
	wd.ip("-n", wd.r, "addr", "add", egressShared+"/32", "dev", "lo")
	wd.ip("-n", wd.r, "addr", "add", egressOther+"/32", "dev", "lo")
	wd.ip("-n", wd.r, "addr", "add", egressV6+"/128", "dev", "lo", "nodad")
	for _, addr := range []string{remoteAddr + ":443", remoteAddr + ":8443", egressOther + ":443", egressShared + ":80",
		"[" + remoteAddr6 + "]:443", "[" + egressV6 + "]:443"} {
		wd.startServer(wd.r, "tcp-echo-server", addr)
	}
	wd.startServer(wd.r, "tls-echo-server", egressShared+":443")
	for _, addr := range []string{remoteAddr + ":5005", remoteAddr + ":5007"} {
		wd.startServer(wd.r, "udp-echo-server", addr)
	}
	ew := &egressWorld{world: wd, queryLog: filepath.Join(t.TempDir(), "queries.log")}
	records := []string{
		"good.egress.test=" + remoteAddr,
		"alias.egress.test=cname:good.egress.test",
		"short.egress.test=" + remoteAddr + "@1",
		"loop.egress.test=127.0.0.1",
		"w.egress.test=" + remoteAddr, "a.w.egress.test=" + remoteAddr,
		"t.egress.test=" + remoteAddr, "x.t.egress.test=" + remoteAddr, "bad.t.egress.test=" + remoteAddr,
		"denied.egress.test=" + egressOther,
		"txt.egress.test=txt:hello", "good.egress.test=txt:secret",
		"cdn-a.egress.test=" + egressShared, "cdn-b.egress.test=" + egressShared,
		"v6.egress.test=" + remoteAddr6,
	}
	wd.startServer(wd.r, append([]string{"dns-server", routerAddr + ":53", "querylog=" + ew.queryLog}, records...)...)
	return ew
}

// queries returns the names the world's DNS server was asked about.
func (ew *egressWorld) queries() string {
	b, _ := os.ReadFile(ew.queryLog)
	return string(b)
}

// stepScript runs each "TAG CMD..." line in the guest and prints
// "TAG rc=N OUTPUT" (output on one line) for it.
func stepScript(steps ...string) string {
	var b strings.Builder
	b.WriteString(`step() { tag=$1; shift; out=$("$@" 2>&1); rc=$?; echo "$tag rc=$rc $(printf %s "$out" | tr '\n' ' ')"; }` + "\n")
	for _, s := range steps {
		b.WriteString("step " + strings.ReplaceAll(s, "NT ", bins.nettool+" ") + "\n")
	}
	return b.String()
}

// stepResults maps each step's tag to "rc=N OUTPUT".
func stepResults(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if tag, rest, ok := strings.Cut(line, " rc="); ok {
			m[tag] = "rc=" + rest
		}
	}
	return m
}

// expectSteps checks that each step's result matches its pattern.
func expectSteps(t *testing.T, res result, want map[string]string) {
	t.Helper()
	got := stepResults(res.stdout)
	for tag, pattern := range want {
		if !regexp.MustCompile(pattern).MatchString(got[tag]) {
			t.Errorf("%s: got %q, want /%s/", tag, got[tag], pattern)
		}
	}
	t.Logf("run:\n%s", res)
}

func TestEgressAllowList(t *testing.T) {
	ew := newEgressWorld(t)
	flags := []string{"--allow", "good.egress.test:443", "--allow", "alias.egress.test:443", "--allow", "short.egress.test:443",
		"--allow", "loop.egress.test:443", "--allow", "*.w.egress.test:443", "--allow", "**.t.egress.test:443",
		"--deny", "bad.t.egress.test"}
	script := stepScript(
		"before NT tcp-connect "+remoteAddr+":443",
		"resolve NT resolve good.egress.test",
		"echo NT tcp-echo-check good.egress.test:443 4000000",
		"otherport NT tcp-connect "+remoteAddr+":8443",
		"otherhost NT tcp-connect "+egressOther+":443",
		"denied NT dns-query 10.0.2.3:53 denied.egress.test udp",
		"deniedtcp NT dns-query 10.0.2.3:53 denied.egress.test tcp",
		"txt NT dns-query 10.0.2.3:53 good.egress.test udp TXT",
		"https NT dns-query 10.0.2.3:53 good.egress.test udp HTTPS",
		"direct NT dns-query "+routerAddr+":53 direct-probe.egress.test udp",
		"directtcp NT dns-query "+routerAddr+":53 direct-probe.egress.test tcp",
		"loop NT dns-query 10.0.2.3:53 loop.egress.test udp",
		"alias NT tcp-echo-check alias.egress.test:443 100000",
		"short NT resolve short.egress.test",
		"shortlater sh -c 'sleep 2; "+bins.nettool+" tcp-echo-check "+remoteAddr+":443 100000'",
		"wbelow NT dns-query 10.0.2.3:53 a.w.egress.test udp",
		"wapex NT dns-query 10.0.2.3:53 w.egress.test udp",
		"tapex NT dns-query 10.0.2.3:53 t.egress.test udp",
		"tbelow NT dns-query 10.0.2.3:53 x.t.egress.test udp",
		"denywins NT dns-query 10.0.2.3:53 bad.t.egress.test udp",
	)
	res := ew.runGuest(flags, "sh", "-c", script)
	expectSteps(t, res, map[string]string{
		"before":    `^rc=0 refused`,
		"resolve":   `^rc=0 addr ` + remoteAddr,
		"echo":      `^rc=0 bytes=4000000 sent_sha256=(\w+) recv_sha256=\w+`,
		"otherport": `^rc=0 refused`,
		"otherhost": `^rc=0 refused`,
		"denied":    `rcode NXDOMAIN`,
		"deniedtcp": `rcode NXDOMAIN`,
		"txt":       `rcode REFUSED`,
		"https":     `^rc=0 rcode NOERROR answers=0`,
		// ICMP administratively prohibited: EHOSTUNREACH for UDP.
		"direct":     `^rc=1 .*no route to host`,
		"directtcp":  `^rc=1 .*connection refused`,
		"loop":       `^rc=0 rcode NOERROR answers=0`,
		"alias":      `^rc=0 bytes=100000 `,
		"short":      `^rc=0 addr ` + remoteAddr,
		"shortlater": `^rc=0 bytes=100000 `,
		"wbelow":     `^rc=0 A ` + remoteAddr,
		"wapex":      `rcode NXDOMAIN`,
		"tapex":      `^rc=0 A ` + remoteAddr,
		"tbelow":     `^rc=0 A ` + remoteAddr,
		"denywins":   `rcode NXDOMAIN`,
	})
	checkEcho(t, result{stdout: strings.TrimPrefix(stepResults(res.stdout)["echo"], "rc=0 ")}, 4000000)
	q := ew.queries()
	for _, name := range []string{"denied.egress.test", "direct-probe.egress.test", "w.egress.test A", "bad.t.egress.test", "TXT", "HTTPS"} {
		if regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name)).MatchString(q) {
			t.Errorf("the upstream was asked %q:\n%s", name, q)
		}
	}
	if !strings.Contains(q, "good.egress.test A") || !strings.Contains(q, "loop.egress.test A") {
		t.Errorf("allowed names did not reach the upstream:\n%s", q)
	}
	// Denials are told on stderr with the rule that would allow them.
	for _, want := range []string{
		"egress: denied tcp " + remoteAddr + ":8443 (good.egress.test): allow it with --allow good.egress.test:8443",
		"egress: denied tcp " + remoteAddr + ":443: allow it with --allow " + remoteAddr + ":443",
		"egress: denied dns A query for denied.egress.test: allow it with --allow denied.egress.test",
		"egress: denied dns answer 127.0.0.1 for loop.egress.test",
		"egress: denied dns A query for bad.t.egress.test: rule deny bad.t.egress.test",
	} {
		if !strings.Contains(res.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, res.stderr)
		}
	}
}

func TestEgressSharedAddress(t *testing.T) {
	ew := newEgressWorld(t)
	script := stepScript(
		"resolve NT dns-query 10.0.2.3:53 cdn-a.egress.test udp",
		"other NT dns-query 10.0.2.3:53 cdn-b.egress.test udp",
		"tlsright NT tls-check "+egressShared+":443 cdn-a.egress.test 1000000",
		"tlsforeign NT tls-check "+egressShared+":443 cdn-b.egress.test 1000",
		"tlsnone NT tls-check "+egressShared+":443 '' 1000",
		// Clients that wait before their ClientHello (past the time the
		// host is dialed anyway) are checked all the same.
		"tlsslow NT tls-check "+egressShared+":443 cdn-b.egress.test 1000 1s",
		"tlsslowright NT tls-check "+egressShared+":443 cdn-a.egress.test 1000 1s",
		"httpright NT http-check "+egressShared+":80 cdn-a.egress.test",
		"httpforeign NT http-check "+egressShared+":80 cdn-b.egress.test",
	)
	res := ew.runGuest([]string{"--allow", "cdn-a.egress.test:443,80"}, "sh", "-c", script)
	expectSteps(t, res, map[string]string{
		"resolve":      `^rc=0 A ` + egressShared,
		"other":        `rcode NXDOMAIN`,
		"tlsright":     `^rc=0 tls sni=cdn-a.egress.test bytes=1000000 sent_sha256=(\w+) recv_sha256=`,
		"tlsforeign":   `^rc=0 reset`,
		"tlsnone":      `^rc=0 reset`,
		"tlsslow":      `^rc=0 reset`,
		"tlsslowright": `^rc=0 tls sni=cdn-a.egress.test bytes=1000 `,
		"httpright":    `^rc=0 http ok`,
		"httpforeign":  `^rc=0 reset`,
	})
	m := regexp.MustCompile(`sent_sha256=(\w+) recv_sha256=(\w+)`).FindStringSubmatch(stepResults(res.stdout)["tlsright"])
	if m == nil || m[1] != m[2] {
		t.Errorf("TLS echo through the allowed name: %v", m)
	}
}

func TestEgressUDPICMPAndIPv6(t *testing.T) {
	ew := newEgressWorld(t)
	ew.sysctl(ew.w, "net.ipv4.ping_group_range", "0 2147483647")
	flags := []string{"--allow", "198.51.100.0/24:5000-5010/udp", "--deny", remoteAddr + ":5007/udp",
		"--allow", remoteAddr + "/icmp", "--allow", "v6.egress.test:443", "--allow", "[" + egressV6 + "]:443"}
	steps := []string{
		"udp NT udp-echo-check " + remoteAddr + ":5005 20 1000",
		"udprange NT udp-probe " + remoteAddr + ":5011 64",
		"udpdeny NT udp-probe " + remoteAddr + ":5007 64",
		"v6before NT tcp-connect [" + remoteAddr6 + "]:443",
		"v6resolve NT dns-query [fd00::3]:53 v6.egress.test udp AAAA",
		"v6echo NT tcp-echo-check [" + remoteAddr6 + "]:443 1000000",
		"v6cidr NT tcp-echo-check [" + egressV6 + "]:443 1000",
		"v6other NT tcp-connect [2001:db8:2::12]:443",
	}
	_, pingErr := exec.LookPath("ping")
	if pingErr == nil {
		steps = append(steps, "ping ping -c 1 -W 5 "+remoteAddr, "pingdenied ping -c 1 -W 5 "+egressOther,
			"ping6denied ping -c 1 -W 5 2001:db8:2::12")
	}
	res := ew.runGuest(flags, "sh", "-c", stepScript(steps...))
	want := map[string]string{
		"udp":       `^rc=0 datagrams=20 size=1000`,
		"udprange":  `icmp type=3 code=13 from=10\.0\.2\.2`,
		"udpdeny":   `icmp type=3 code=13 from=10\.0\.2\.2`,
		"v6before":  `^rc=0 refused`,
		"v6resolve": `^rc=0 AAAA ` + remoteAddr6,
		"v6echo":    `^rc=0 bytes=1000000 `,
		"v6cidr":    `^rc=0 bytes=1000 `,
		"v6other":   `^rc=0 refused`,
	}
	if pingErr == nil {
		want["ping"] = `^rc=0 .*1 received`
		want["pingdenied"] = `From 10\.0\.2\.2 .*(?i)packet filtered`
		want["ping6denied"] = `From fd00::2 .*(?i)administratively prohibited`
	}
	expectSteps(t, res, want)
}

func TestEgressAudit(t *testing.T) {
	ew := newEgressWorld(t)
	dir := userDir(t, "egress-audit-")
	logPath := filepath.Join(dir, "decisions.jsonl")
	script := stepScript(
		"allowed NT tcp-echo-check good.egress.test:443 1000",
		"other NT tcp-echo-check "+egressOther+":443 1000",
		"name NT dns-query 10.0.2.3:53 denied.egress.test udp",
	)
	res := ew.runGuest([]string{"--egress-audit", "--allow", "good.egress.test:443"}, "sh", "-c", script)
	expectSteps(t, res, map[string]string{
		"allowed": `^rc=0 bytes=1000 `,
		"other":   `^rc=0 bytes=1000 `,
		"name":    `^rc=0 A ` + egressOther,
	})
	for _, want := range []string{
		"egress: audit: would deny tcp " + egressOther + ":443: allow it with --allow " + egressOther + ":443",
		"egress: audit: would deny dns A query for denied.egress.test: allow it with --allow denied.egress.test",
		"# egress audit: suggested policy",
		"\nallow " + egressOther + ":443\n",
		"\nallow good.egress.test:443\n",
	} {
		if !strings.Contains(res.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, res.stderr)
		}
	}
	// The same with a decision log: one JSON line per decision.
	res = ew.runGuest([]string{"--egress-audit", "--allow", "good.egress.test:443", "--egress-log", logPath}, "sh", "-c", script)
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	type rec struct{ Time, Proto, Addr, Name, Rule, Verdict, QType string }
	var found []string
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		var r rec
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.Time == "" {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		found = append(found, r.Proto+" "+r.Addr+" "+r.Name+" "+r.Verdict)
	}
	all := strings.Join(found, "\n")
	for _, want := range []string{"tcp " + egressOther + "  audit", "tcp " + remoteAddr + " good.egress.test allow", "dns  denied.egress.test audit"} {
		if !strings.Contains(all, want) {
			t.Errorf("decision log lacks %q:\n%s", want, all)
		}
	}
	if strings.Contains(res.stderr, "egress: audit: would deny") {
		t.Errorf("with --egress-log, notices went to stderr too:\n%s", res.stderr)
	}
}

func TestEgressRuntimeAPI(t *testing.T) {
	ew := newEgressWorld(t)
	sock := filepath.Join(userDir(t, "egress-api-"), "api.sock")
	out := ew.startGuestScript([]string{"--api-socket", sock, "--allow", "good.egress.test:443"},
		fmt.Sprintf("i=0; while [ $i -lt 600 ]; do %s tcp-connect %s:443; i=$((i+1)); sleep 0.1; done", bins.nettool, egressOther))
	waitLine := func(want string) {
		t.Helper()
		for i := 0; i < 300; i++ {
			line, err := out.ReadString('\n')
			if err != nil {
				t.Fatalf("guest output ended waiting for %q: %v", want, err)
			}
			if strings.TrimSpace(line) == want {
				return
			}
		}
		t.Fatalf("no %q from the guest", want)
	}
	waitLine("refused")
	reply := apiCall(t, sock, `{"execute":"add_egress_rule","arguments":{"verdict":"allow","rule":"`+egressOther+`:443"}}`)
	var added struct {
		Return struct{ ID int } `json:"return"`
	}
	if err := json.Unmarshal([]byte(reply), &added); err != nil || added.Return.ID != 2 {
		t.Fatalf("add_egress_rule: %s", reply)
	}
	waitLine("connected")
	policy := apiCall(t, sock, `{"execute":"get_egress_policy"}`)
	if !strings.Contains(policy, `{"id":2,"verdict":"allow","rule":"`+egressOther+`:443"}`) {
		t.Errorf("get_egress_policy: %s", policy)
	}
	stats, err := execCommand(bins.netnsRun, "stats", sock)
	if err != nil || !strings.Contains(stats, "2 allow "+egressOther+":443") || !strings.Contains(stats, "egress      allow list, 2 rules") {
		t.Errorf("netns-run stats: %v\n%s", err, stats)
	}
	if reply := apiCall(t, sock, `{"execute":"add_egress_rule","arguments":{"verdict":"allow","rule":"x:0"}}`); !strings.Contains(reply, `bad request: add_egress_rule: rule \"x:0\": port 0 out of range`) {
		t.Errorf("bad rule: %s", reply)
	}
	if reply := apiCall(t, sock, `{"execute":"remove_egress_rule","arguments":{"id":2}}`); reply != `{"return":{}}` {
		t.Fatalf("remove_egress_rule: %s", reply)
	}
	waitLine("refused")
	var st struct {
		Return struct {
			Egress struct{ Allowed, Denied uint64 } `json:"egress"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(apiCall(t, sock, `{"execute":"get_stats"}`)), &st); err != nil || st.Return.Egress.Allowed == 0 || st.Return.Egress.Denied < 2 {
		t.Errorf("get_stats egress counts: %+v %v", st.Return.Egress, err)
	}
}

func TestEgressUsernet(t *testing.T) {
	ew := newEgressWorld(t)
	dir := userDir(t, "egress-usernet-")
	policy := filepath.Join(dir, "policy")
	if err := os.WriteFile(policy, []byte("# usernet\n"+fillerRules(10000)+"allow good.egress.test:443\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "decisions.jsonl")
	sb := ew.startSandbox()
	u := ew.startUsernet("-c", "--mtu=65520", "--enable-sandbox", "--policy", policy, "--egress-log", logPath, "--deny", "alias.egress.test",
		fmt.Sprint(sb.pid), "tap0")
	if out := ew.inSandbox(sb, bins.nettool, "tcp-connect", remoteAddr+":443"); !strings.Contains(out, "refused") {
		t.Errorf("before resolving: %s", out)
	}
	if out := ew.inSandbox(sb, bins.nettool, "dns-query", "10.0.2.3:53", "good.egress.test", "udp"); !strings.Contains(out, "A "+remoteAddr) {
		t.Fatalf("resolve: %s", out)
	}
	checkEcho(t, result{stdout: ew.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":443", "1000000")}, 1000000)
	for _, args := range [][]string{
		{"tcp-connect", egressOther + ":443"},
		{"tcp-connect", remoteAddr + ":8443"},
	} {
		if out := ew.inSandbox(sb, append([]string{bins.nettool}, args...)...); !strings.Contains(out, "refused") {
			t.Errorf("%v: %s", args, out)
		}
	}
	cmd := ew.sandboxCommand(sb, bins.nettool, "dns-query", "10.0.2.3:53", "alias.egress.test", "udp")
	if out, _ := cmd.CombinedOutput(); !strings.Contains(string(out), "NXDOMAIN") {
		t.Errorf("denied name: %s", out)
	}
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status %d\n%s", code, &u.stderr)
	}
	b, err := os.ReadFile(logPath)
	if err != nil || !strings.Contains(string(b), `"addr":"`+egressOther+`","port":443,"verdict":"deny"`) {
		t.Errorf("decision log: %v\n%s", err, b)
	}
	if strings.Contains(ew.queries(), "alias.egress.test") {
		t.Errorf("a denied name reached the upstream:\n%s", ew.queries())
	}
}

// execCommand runs a command in the test's own namespaces and returns its
// combined output.
func execCommand(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// TestEgressPasta: the same options in usernet's pasta mode, as podman
// would pass them through containers.conf.
func TestEgressPasta(t *testing.T) {
	ew := newEgressWorld(t)
	pasta := pastaLink(t)
	nsPath := ew.containerNetns()
	if out, code := ew.runPasta(pasta, podmanArgs(nsPath, "--allow", "good.egress.test:443", "--deny", "alias.egress.test")...); code != 0 {
		t.Fatalf("pasta exited %d:\n%s", code, out)
	}
	daemonsFor(t, nsPath)
	if got := inNetns(t, nsPath, bins.nettool, "tcp-connect", remoteAddr+":443"); !strings.Contains(got, "refused") {
		t.Errorf("before resolving: %s", got)
	}
	if got := inNetns(t, nsPath, bins.nettool, "dns-query", "169.254.1.1:53", "good.egress.test", "tcp"); !strings.Contains(got, "A "+remoteAddr) {
		t.Fatalf("resolve through --dns-forward: %s", got)
	}
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", remoteAddr+":443", "1000000")}, 1000000)
	if got := inNetns(t, nsPath, bins.nettool, "tcp-connect", egressOther+":443"); !strings.Contains(got, "refused") {
		t.Errorf("another host: %s", got)
	}
	if got := inNetns(t, nsPath, "sh", "-c", bins.nettool+" dns-query 169.254.1.1:53 alias.egress.test udp 2>&1; true"); !strings.Contains(got, "NXDOMAIN") {
		t.Errorf("denied name: %s", got)
	}
	if got := inNetns(t, nsPath, "sh", "-c", bins.nettool+" dns-query "+routerAddr+":53 good.egress.test udp 2>&1; true"); strings.Contains(got, "A "+remoteAddr) {
		t.Errorf("DNS to another resolver answered: %s", got)
	}
	if strings.Contains(ew.queries(), "alias.egress.test") {
		t.Errorf("a denied name reached the upstream:\n%s", ew.queries())
	}
}

// TestEgressHostLoopback: the gateway is the host's loopback and follows
// the rules like any other destination; --disable-host-loopback wins.
func TestEgressHostLoopback(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8081")
	script := stepScript(
		"allowed NT tcp-echo-check 10.0.2.2:8080 100000",
		"other NT tcp-connect 10.0.2.2:8081",
		"metadata NT tcp-connect 169.254.169.254:80",
	)
	res := wd.runGuest([]string{"--allow", "127.0.0.1:8080"}, "sh", "-c", script)
	expectSteps(t, res, map[string]string{
		"allowed":  `^rc=0 bytes=100000 `,
		"other":    `^rc=0 refused`,
		"metadata": `^rc=0 refused`,
	})
	if !strings.Contains(res.stderr, "egress: denied tcp 169.254.169.254:80: link-local and metadata addresses need an address rule") {
		t.Errorf("metadata denial not explained:\n%s", res.stderr)
	}
	// 10,000 rules reach the sandboxed engine (once, they did not fit in
	// its environment).
	policy := filepath.Join(userDir(t, "egress-policy-"), "policy")
	if err := os.WriteFile(policy, []byte(fillerRules(10000)), 0o644); err != nil {
		t.Fatal(err)
	}
	res = wd.runGuest([]string{"--policy", policy, "--allow", "127.0.0.1:8080"}, "sh", "-c", script)
	expectSteps(t, res, map[string]string{"allowed": `^rc=0 bytes=100000 `, "other": `^rc=0 refused`})
	// In netns-run's own process, with the decision log on stderr.
	res = wd.runGuest([]string{"--allow", "127.0.0.1:8080", "--no-sandbox", "--egress-log", "-"}, "sh", "-c", stepScript(
		"allowed NT tcp-connect 10.0.2.2:8080",
	))
	expectSteps(t, res, map[string]string{"allowed": `^rc=0 connected`})
	if !regexp.MustCompile(`(?m)^\{"time":"[^"]+","proto":"tcp","addr":"127\.0\.0\.1","port":8080,"rule":"allow 127\.0\.0\.1:8080","verdict":"allow"\}$`).MatchString(res.stderr) {
		t.Errorf("no JSON decision on stderr:\n%s", res.stderr)
	}
	res = wd.runGuest([]string{"--allow", "127.0.0.1:8080", "--disable-host-loopback"}, "sh", "-c", stepScript(
		"allowed NT tcp-connect 10.0.2.2:8080",
	))
	expectSteps(t, res, map[string]string{"allowed": `^rc=0 unreachable`})
}

// fillerRules is a policy of n rules that none of the tests' flows match.
func fillerRules(n int) string {
	var b strings.Builder
	for i := 0; i < n; i++ {
		switch i % 4 {
		case 0:
			fmt.Fprintf(&b, "allow host%d.filler.example:443\n", i)
		case 1:
			fmt.Fprintf(&b, "allow *.svc%d.filler.example\n", i)
		case 2:
			fmt.Fprintf(&b, "allow 10.%d.%d.0/24:8000-8099/tcp\n", i>>8&255, i&255)
		case 3:
			fmt.Fprintf(&b, "deny [2001:db8:%x::/48]:53/udp\n", i)
		}
	}
	return b.String()
}

// A policy of thousands of rules crosses from the engine whole: its
// listing is larger than one control message.
func TestEgressLargePolicyOverAPI(t *testing.T) {
	ew := newEgressWorld(t)
	dir := userDir(t, "egress-large-")
	sock := filepath.Join(dir, "api.sock")
	var rules strings.Builder
	const n = 3000
	for i := range n {
		fmt.Fprintf(&rules, "allow host%d.egress.test:443\n", i)
	}
	policy := filepath.Join(dir, "policy")
	if err := os.WriteFile(policy, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out := ew.startGuestScript([]string{"--api-socket", sock, "--policy", policy}, "echo up; sleep 60")
	if line, err := out.ReadString('\n'); err != nil || strings.TrimSpace(line) != "up" {
		t.Fatalf("guest: %q, %v", line, err)
	}
	reply := apiCall(t, sock, `{"execute":"get_egress_policy"}`)
	var got struct {
		Return struct {
			Rules []struct{ Rule string } `json:"rules"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(reply), &got); err != nil || len(got.Return.Rules) != n || got.Return.Rules[n-1].Rule != fmt.Sprintf("host%d.egress.test:443", n-1) {
		t.Errorf("get_egress_policy: %d rules, %v; reply starts %.200q", len(got.Return.Rules), err, reply)
	}
	if stats, err := execCommand(bins.netnsRun, "stats", sock); err != nil || !strings.Contains(stats, fmt.Sprintf("%d rules", n)) {
		t.Errorf("netns-run stats: %v\n%.300s", err, stats)
	}
}
