// Command nettool is the traffic generator and test server of the
// integration tests and benchmarks: echo servers, a DNS server that knows
// test names, and clients that check what comes back with sha256.
//
// Servers print "listening ADDR" on stdout once ready. Clients print one
// result line and exit non-zero on any mismatch.
package main

import (
	"fmt"
	"os"
)

type command struct {
	usage string
	run   func(args []string) error
}

var commands = map[string]command{
	"tcp-echo-server":   {"ADDR", tcpEchoServer},
	"udp-echo-server":   {"ADDR", udpEchoServer},
	"dns-server":        {"ADDR [querylog=PATH] NAME=IP|cname:NAME|txt:TEXT[@TTL]...", dnsServer},
	"tls-echo-server":   {"ADDR", tlsEchoServer},
	"tls-check":         {"ADDR SNI BYTES [DELAY]", tlsCheck},
	"http-check":        {"ADDR HOST", httpCheck},
	"tcp-echo-check":    {"ADDR BYTES", tcpEchoCheck},
	"tcp-echo-many":     {"ADDR CONNS BYTES", tcpEchoMany},
	"udp-echo-check":    {"ADDR COUNT SIZE", udpEchoCheck},
	"dns-query":         {"SERVER NAME udp|tcp [TYPE]", dnsQuery},
	"resolve":           {"NAME", resolve},
	"tcp-connect":       {"ADDR", tcpConnect},
	"sleep":             {"TOKEN", sleepForever},
	"peer-server":       {"tcp|udp ADDR", peerServer},
	"udp-probe":         {"ADDR TTL", udpProbe},
	"tcp-conns":         {"ADDR COUNT PARALLEL", tcpConns},
	"rr":                {"ADDR SECONDS", requestResponse},
	"spray":             {"tcp|udp HOST FIRSTPORT COUNT", spray},
	"peer-query":        {"tcp|udp ADDR", peerQuery},
	"tcp-reconnect":     {"ADDR LOCALPORT COUNT BYTES", tcpReconnect},
	"burst-server":      {"ADDR BYTES", burstServer},
	"hold":              {"ADDR COUNT SECONDS", holdConns},
	"api-call":          {"SOCKET REQUEST", apiCall},
	"stream-sink":       {"ADDR", streamSink},
	"stream":            {"ADDR STREAMS SECONDS", streamSource},
	"ptrace-probe":      {"PID", ptraceProbe},
	"fin-then-reset":    {"ADDR", finThenReset},
	"close-wait-server": {"ADDR FILE", closeWaitServer},
	"flood-server":      {"ADDR", floodServer},
	"dns-flood":         {"SERVER SECONDS", dnsFlood},
	"ping-spray":        {"HOST COUNT", pingSpray},
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	c, ok := commands[os.Args[1]]
	if !ok {
		usage()
	}
	if err := c.run(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "nettool %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: nettool COMMAND ARGS...")
	for name, c := range commands {
		fmt.Fprintf(os.Stderr, "  %s %s\n", name, c.usage)
	}
	os.Exit(2)
}

func needArgs(args []string, n int) error {
	if len(args) != n {
		return fmt.Errorf("want %d arguments, got %d", n, len(args))
	}
	return nil
}
