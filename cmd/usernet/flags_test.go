package main

import (
	"errors"
	"io"
	"strings"
	"testing"
)

func TestParseArgsForms(t *testing.T) {
	// Both --opt=value and --opt value, options after positionals.
	c, err := parseArgs(strings.Fields("--mtu 65520 -c 1234 tap0 --cidr=10.0.3.0/24 -r 3 --api-socket /tmp/x.sock"), io.Discard, true)
	if err != nil {
		t.Fatal(err)
	}
	if c.mtu != 65520 || !c.configure || c.pid != 1234 || c.tapName != "tap0" || c.cidr.String() != "10.0.3.0/24" || c.readyFD != 3 || c.apiSocket != "/tmp/x.sock" {
		t.Errorf("parsed %+v", c)
	}
	var out strings.Builder
	if _, err := parseArgs(strings.Fields("--no-host-loopback --create-sandbox 1 tap0 extra"), &out, true); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--no-host-loopback is deprecated", "--create-sandbox is deprecated", "WARNING: too many arguments"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q: %s", want, out.String())
		}
	}
}

// TestParseArgsHostPaths: the paths must exist before the re-exec into the
// sandbox, and are not looked up in it (where they may not exist).
func TestParseArgsHostPaths(t *testing.T) {
	line := strings.Fields("--netns-type=path --userns-path=/nonexistent/user /nonexistent/net tap0")
	if _, err := parseArgs(line, io.Discard, true); err == nil || !strings.Contains(err.Error(), "userns path doesn't exist") {
		t.Errorf("missing userns path outside the sandbox: %v", err)
	}
	c, err := parseArgs(line, io.Discard, false)
	if err != nil {
		t.Fatalf("in the sandbox: %v", err)
	}
	if c.netnsPath != "/nonexistent/net" || c.usernsPath != "/nonexistent/user" {
		t.Errorf("parsed %+v", c)
	}
}

// FuzzParseArgs: any command line gives a config or a usage error, never
// a panic, and an accepted config is within slirp4netns's limits.
func FuzzParseArgs(f *testing.F) {
	for _, s := range []string{
		"--configure --mtu=65520 --api-socket /tmp/s -r 3 -e 4 1234 tap0",
		"-c6 --netns-type=path --userns-path=/proc/1/ns/user /proc/1/ns/net tap0",
		"--cidr 10.0.2.0/24 --macaddress=52:54:00:12:34:56 -c 1 tap0",
		"--mtu= -- 1 tap0", "-m -1 1 tap0", "--target-type=bess 1", "-h", "-v", "",
		"--allow **.pypi.org:443 --deny 192.0.2.0/24:53/udp --egress-audit 1 tap0",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		c, err := parseArgs(strings.Fields(line), io.Discard, true)
		if err != nil {
			var ue *usageError
			if !errors.As(err, &ue) {
				t.Fatalf("%q: error %v is not a usage error", line, err)
			}
			return
		}
		if c.help || c.version {
			return
		}
		if c.mtu < 1 || c.mtu > 65521 || c.tapName == "" || (c.pid <= 0 && c.netnsPath == "") || c.cidr.Bits() < 1 || c.cidr.Bits() > 25 {
			t.Fatalf("%q: accepted bad config %+v", line, c)
		}
	})
}

func TestParseArgsEgress(t *testing.T) {
	c, err := parseArgs(strings.Fields("--allow github.com:443 --allow=**.pypi.org:443 --deny 192.0.2.0/24 --egress-audit --egress-log - 1 tap0"), io.Discard, true)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.egress.Allow, ",") != "github.com:443,**.pypi.org:443" || len(c.egress.Deny) != 1 || !c.egress.Audit || c.egress.Log != "-" {
		t.Errorf("parsed %+v", c.egress)
	}
	_, err = parseArgs(strings.Fields("--allow example.com:99999 1 tap0"), io.Discard, true)
	var ue *usageError
	if !errors.As(err, &ue) || !ue.noUsage || !strings.Contains(ue.msg, `--allow: rule "example.com:99999": port 99999 out of range`) {
		t.Errorf("bad rule: %v", err)
	}
}
