package main

import (
	"errors"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/netns-run/netns-run/portfwd"
)

// The exact argument lists the runtimes pass (see
// ../shared/reference/pasta-interface.md).
var (
	podmanArgs          = strings.Fields("--config-net --dns-forward 169.254.1.1 -t none -u none -T none -U none --no-map-gw --quiet --netns /run/user/1000/netns/netns-1 --map-guest-addr 169.254.1.2")
	podmanPort          = strings.Fields("--config-net --pid /run/user/1000/rootless-netns-conn.pid -t 8080-8080:80-80 -t 127.0.0.1/8443-8444:443-444 -u 5353-5353:53-53 --dns-forward 169.254.1.1 -T none -U none --no-map-gw --quiet --netns /run/user/1000/netns/netns-1 --map-guest-addr 169.254.1.2")
	rootlesskitArgs     = strings.Fields("--stderr --ns-ifname=tap0 --mtu=65520 --config-net --address=10.0.2.100 --netmask=24 --gateway=10.0.2.2 --dns-forward=10.0.2.3 --no-map-gw --ipv4-only --tcp-ports=auto --udp-ports=auto --host-lo-to-ns-lo 4242")
	rootlesskitDetached = strings.Fields("--stderr --ns-ifname=tap0 --mtu=65520 --config-net --address=10.0.2.100 --netmask=24 --gateway=10.0.2.2 --dns-forward=10.0.2.3 --tcp-ports=none --udp-ports=none --userns=/proc/42/ns/user --netns=/run/rk/netns")
	netbenchArgs        = strings.Fields("-4 --config-net -a 10.0.2.100 -n 24 -g 10.0.2.2 -o 127.0.0.1 -m 65520 -u none -T none -U none -q --runas 0 -t 127.0.0.1/5201:5201 -t 127.0.0.1/7001:7001 -l /tmp/pasta.log -P /tmp/pasta.pid 4242")
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestPastaArgsOfRuntimes(t *testing.T) {
	c, out, err := parsePastaArgs(podmanArgs)
	if err != nil || out != pastaRun {
		t.Fatalf("podman: %v %v", out, err)
	}
	if !c.configNet || !c.noMapGW || c.netns != "/run/user/1000/netns/netns-1" || c.pid != 0 ||
		len(c.dnsForward) != 1 || c.dnsForward[0] != addr("169.254.1.1") || len(c.mapGuestAddr) != 1 ||
		c.tcp.Mode != portfwd.PortsNone || c.udpNS.Mode != portfwd.PortsNone {
		t.Errorf("podman: %+v", c)
	}
	c, _, err = parsePastaArgs(podmanPort)
	if err != nil {
		t.Fatal(err)
	}
	if c.pidFile != "/run/user/1000/rootless-netns-conn.pid" || c.tcp.Mode != portfwd.PortsList || c.tcp.Count() != 3 || c.udp.Count() != 1 ||
		c.tcp.Ranges[1].Addr != addr("127.0.0.1") || c.tcp.Ranges[1].To != 443 {
		t.Errorf("podman with ports: %+v", c)
	}
	c, _, err = parsePastaArgs(rootlesskitArgs)
	if err != nil {
		t.Fatal(err)
	}
	if c.nsIfname != "tap0" || c.mtu != 65520 || c.addrs[0] != addr("10.0.2.100") || c.netmask != 24 || c.gateways[0] != addr("10.0.2.2") ||
		!c.ipv4Only || !c.hostLoToNsLo || c.tcp.Mode != portfwd.PortsAuto || c.tcpNS.Mode != portfwd.PortsUnset || c.pid != 4242 {
		t.Errorf("rootlesskit: %+v", c)
	}
	c, _, err = parsePastaArgs(rootlesskitDetached)
	if err != nil {
		t.Fatal(err)
	}
	if c.userns != "/proc/42/ns/user" || c.netns != "/run/rk/netns" || c.pid != 0 {
		t.Errorf("rootlesskit --detach-netns: %+v", c)
	}
	// netbench runs as root; --runas must name the user we are.
	bench := append([]string(nil), netbenchArgs...)
	bench[slices.Index(bench, "--runas")+1] = strconv.Itoa(os.Getuid())
	c, _, err = parsePastaArgs(bench)
	if err != nil {
		t.Fatal(err)
	}
	if c.outbound[0] != addr("127.0.0.1") || c.logFile != "/tmp/pasta.log" || c.pidFile != "/tmp/pasta.pid" || c.tcp.Count() != 2 {
		t.Errorf("netbench: %+v", c)
	}
}

func TestPastaArgsGetopt(t *testing.T) {
	for _, tc := range []struct {
		args    string
		outcome pastaOutcome
		err     string // "" for success; getopt errors are checked by text
	}{
		{"--version", pastaVersion, ""},
		{"--host-lo-to-ns-lo --version", pastaVersion, ""},
		{"--version --no-such-option", pastaVersion, ""},
		{"-h", pastaHelp, ""},
		{"--no-such-option --version", pastaRun, "unrecognized option '--no-such-option'"},
		{"--map-guest-addrx=1 --config-net 1", pastaRun, "unrecognized option '--map-guest-addrx=1'"},
		{"--quiet=1", pastaRun, "option '--quiet' doesn't allow an argument"},
		{"--tcp x", pastaRun, "option '--tcp' is ambiguous; possibilities: '--tcp-ports' '--tcp-ns'"},
		{"-t", pastaRun, "option requires an argument -- 't'"},
		{"--netns", pastaRun, "option '--netns' requires an argument"},
		{"-x", pastaRun, "invalid option -- 'x'"},
		// Abbreviations, bundles, -tVALUE, stop at the first non-option.
		{"--config --ns-if=tap0 -4q -tnone 1", pastaRun, ""},
		{"--config-net 1 --bogus", pastaRun, "unexpected arguments"},
		{"--config-net -- 1", pastaRun, ""},
	} {
		_, out, err := parsePastaArgs(strings.Fields(tc.args))
		var ge *getoptError
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.args, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: got %v, want %q", tc.args, err, tc.err)
		case strings.Contains(tc.err, "option") && !errors.As(err, &ge):
			t.Errorf("%q: %v is not a getopt error", tc.args, err)
		case out != tc.outcome:
			t.Errorf("%q: outcome %v, want %v", tc.args, out, tc.outcome)
		}
	}
}

func TestPastaArgsRefused(t *testing.T) {
	for _, args := range []string{
		"--config-net",                 // no target
		"1",                            // no --config-net
		"--config-net sh -c true",      // a command
		"--config-net --netns x 1",     // PID and --netns
		"--config-net --no-tcp 1",      // not implemented
		"--config-net -t all 1",        // not implemented
		"--config-net -t ~22 1",        // not implemented
		"--config-net -t none -t 22 1", // conflicting specs
		"--config-net -a 10.0.2.1 -a 10.0.2.2 1",
		"--config-net -n 33 1", "--config-net -n 255.0.255.0 1", "--config-net -m 10 1",
		"--config-net -4 -6 1", "--config-net --runas 12345 1", "--config-net -I a/b 1",
		"--config-net --map-guest-addr x 1", "--config-net --dns-forward 1.2.3 1",
	} {
		if c, _, err := parsePastaArgs(strings.Fields(args)); err == nil {
			t.Errorf("%q accepted: %+v", args, c)
		}
	}
}

func TestPastaArgsValues(t *testing.T) {
	c, _, err := parsePastaArgs(strings.Fields("--config-net -n 255.255.240.0 --netns ns1 --map-host-loopback none -D none -m 0 -a fd00::5"))
	if err != nil {
		t.Fatal(err)
	}
	if c.netmask != 20 || c.netns != "/run/netns/ns1" || !c.noMapHostLoopback || !c.dnsNone || c.mtu != 0 || c.addrs[0] != addr("fd00::5") {
		t.Errorf("%+v", c)
	}
}

// FuzzPastaArgs: any command line gives a config, help, version or an
// error, never a panic.
func FuzzPastaArgs(f *testing.F) {
	for _, a := range [][]string{podmanArgs, podmanPort, rootlesskitArgs, rootlesskitDetached, netbenchArgs} {
		f.Add(strings.Join(a, "\x00"))
	}
	for _, s := range []string{"--version", "-h", "--tcp x", "-tnone\x00-46fq", "--netns=\x00--", "-a", "--config-net\x001"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, out, err := parsePastaArgs(strings.Split(s, "\x00"))
		if err == nil && out == pastaRun && (c.pid == 0 && c.netns == "" || !c.configNet) {
			t.Fatalf("%q accepted without a target or --config-net: %+v", s, c)
		}
	})
}

func TestPastaArgsEgress(t *testing.T) {
	c, _, err := parsePastaArgs(strings.Fields("--config-net --allow github.com:443 --deny=bad.example --egress-audit --policy /x --egress-log /y 42"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.egress.Allow) != 1 || len(c.egress.Deny) != 1 || !c.egress.Audit || c.egress.Policy != "/x" || c.egress.Log != "/y" {
		t.Errorf("parsed %+v", c.egress)
	}
	if _, _, err := parsePastaArgs(strings.Fields("--config-net --allow *.* 42")); err == nil || !strings.Contains(err.Error(), `rule "*.*"`) {
		t.Errorf("bad rule: %v", err)
	}
}
