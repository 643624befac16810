package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/pflag"

	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/portfwd"
)

const statsUsage = `Usage: netns-run stats [--json] SOCKET|DIR
Print what a running netns-run (started with --api-socket) or usernet (-a)
is doing: configuration, flows, bytes, drops, published ports and the
egress policy. DIR is a directory holding api.sock.
`

// runStats is the "netns-run stats" subcommand.
func runStats(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("netns-run stats", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	asJSON := fs.Bool("json", false, "print the raw get_info, get_stats and get_egress_policy replies as one JSON object")
	help := fs.BoolP("help", "h", false, "show this help")
	if err := fs.Parse(args); err != nil || *help || fs.NArg() != 1 {
		if *help {
			fmt.Fprint(stdout, statsUsage+fs.FlagUsages())
			return 0
		}
		fmt.Fprintf(stderr, "netns-run stats: %v\n%s", errOr(err, "want one SOCKET"), statsUsage)
		return exitSetupFailed
	}
	sock := fs.Arg(0)
	if st, err := os.Stat(sock); err == nil && st.IsDir() {
		sock = filepath.Join(sock, "api.sock")
	}
	var info struct {
		Return struct {
			Network netstack.Info     `json:"network"`
			Ports   []json.RawMessage `json:"ports"`
		} `json:"return"`
	}
	var stats struct {
		Return netstack.Stats `json:"return"`
	}
	var policy struct {
		Return *egress.Listing `json:"return"`
	}
	rawInfo, err := call(sock, "get_info", &info)
	if err == nil {
		var rawStats json.RawMessage
		rawStats, err = call(sock, "get_stats", &stats)
		// Helpers without an egress policy do not know the command.
		rawPolicy, perr := call(sock, "get_egress_policy", &policy)
		if perr != nil {
			rawPolicy = json.RawMessage("null")
		}
		if err == nil && *asJSON {
			fmt.Fprintf(stdout, "{\"info\":%s,\"stats\":%s,\"egress_policy\":%s}\n", rawInfo, rawStats, rawPolicy)
			return 0
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "netns-run stats: %v\n", err)
		return exitSetupFailed
	}
	printStats(stdout, info.Return.Network, stats.Return, info.Return.Ports)
	printEgress(stdout, stats.Return.Egress, policy.Return)
	return 0
}

// printEgress shows the egress policy's counts and rules.
func printEgress(w io.Writer, st egress.Stats, l *egress.Listing) {
	if !st.Active {
		fmt.Fprintln(w, "egress      off (no rules)")
		return
	}
	mode := "deny list"
	switch {
	case st.Audit:
		mode = "audit (blocks nothing)"
	case l != nil && l.DefaultDeny:
		mode = "allow list"
	}
	fmt.Fprintf(w, "egress      %s, %d rules; flows allowed %d, denied %d, audited %d\n", mode, st.Rules, st.Allowed, st.Denied, st.Audited)
	fmt.Fprintf(w, "egress dns  forwarded %d, denied %d, refused %d, empty %d; answers dropped %d; pins %d\n",
		st.DNSForwarded, st.DNSDenied, st.DNSRefused, st.DNSEmpty, st.AnswersDropped, st.Pins)
	if l == nil {
		return
	}
	for _, r := range l.Rules {
		fmt.Fprintf(w, "  %d %s %s\n", r.ID, r.Verdict, r.Rule)
	}
}

func call(sock, execute string, into any) (json.RawMessage, error) {
	raw, err := portfwd.Call(sock, map[string]string{"execute": execute})
	if err != nil {
		return nil, err
	}
	var probe struct {
		Error *struct {
			Desc string `json:"desc"`
		} `json:"error"`
	}
	if json.Unmarshal(raw, &probe) == nil && probe.Error != nil {
		return nil, fmt.Errorf("%s: %s (is this a netns-run or usernet API socket?)", execute, probe.Error.Desc)
	}
	if err := json.Unmarshal(raw, into); err != nil {
		return nil, fmt.Errorf("%s: %w", execute, err)
	}
	return raw, nil
}

func printStats(w io.Writer, in netstack.Info, st netstack.Stats, ports []json.RawMessage) {
	fmt.Fprintf(w, "uptime      %.0fs\n", st.UptimeSeconds)
	fmt.Fprintf(w, "network     %s gateway %s dns %s mtu %d", in.Network, in.Gateway, in.DNS, in.MTU)
	if in.IPv6 {
		fmt.Fprintf(w, "; %s gateway %s dns %s", in.Network6, in.Gateway6, in.DNS6)
	}
	fmt.Fprintf(w, "\nhost        loopback %s, dns forwarder %s, ping %s\n", onOff(in.HostLoopback), onOff(in.DNSForwarder), in.ICMPEcho4)
	f := st.Flows
	fmt.Fprintf(w, "flows open  tcp %d, udp %d, icmp %d\n", f.TCPOpen, f.UDPOpen, f.ICMPOpen)
	fmt.Fprintf(w, "flows total tcp %d, udp %d, icmp %d; tcp ended in the namespace's kernel %d (translated there %d)\n",
		f.TCPTotal, f.UDPTotal, f.ICMPTotal, f.TCPKernelTotal, f.TCPKernelNATTotal)
	fmt.Fprintf(w, "bytes       %s from guest, %s to guest\n", size(st.Bytes.FromGuest), size(st.Bytes.ToGuest))
	fmt.Fprintf(w, "link        rx %d frames (%s), tx %d frames (%s)\n", st.Link.RxPackets, size(st.Link.RxBytes), st.Link.TxPackets, size(st.Link.TxBytes))
	d := st.Drops
	fmt.Fprintf(w, "drops       queue full %d, blocked loopback %d, icmp unavailable %d, flow limit %d, malformed %d\n",
		d.QueueFull, d.BlockedLoopback, d.ICMPUnavailable, d.FlowLimit, d.Malformed)
	fmt.Fprintf(w, "published   %d\n", len(ports))
	for _, p := range ports {
		fmt.Fprintf(w, "  %s\n", p)
	}
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func size(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.2f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func errOr(err error, msg string) error {
	if err != nil {
		return err
	}
	return errors.New(msg)
}
