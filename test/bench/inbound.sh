#!/usr/bin/env bash
# Inbound (host -> guest through a published port) TCP throughput of
# netns-run -p with both port drivers, side by side with slirp4netns's API
# forwarding, pasta -t, usernet's API forwarding and a veth pair, in one run.
#
#   sudo test/bench/inbound.sh            # DUR=5 REPS=3
#   QUICK=1 sudo test/bench/inbound.sh    # DUR=2 REPS=1
#
# The reference rows come from ../shared/bench/netbench.sh (same iperf3
# parameters); traffic stays on loopback and in namespaces it creates.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
netbench=${NETBENCH:-$top/../shared/bench/netbench.sh}
export PATH="$PATH:/usr/local/go/bin"
[ "$(id -u)" = 0 ] || { echo "run as root (the harness creates namespaces)" >&2; exit 1; }
for t in iperf3 jq; do command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 1; }; done
if [ "${QUICK:-}" = 1 ]; then DUR=${DUR:-2}; REPS=${REPS:-1}; else DUR=${DUR:-5}; REPS=${REPS:-3}; fi
export DUR REPS

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$top" && go build -o "$work/netns-run" ./cmd/netns-run && go build -o "$work/usernet" ./cmd/usernet)

tsv=$work/results.tsv
IMPLS="veth slirp4netns pasta slirp-compatible:$work/usernet" RESULTS=$tsv bash "$netbench" > "$work/netbench.md" 2> "$work/netbench.log" ||
	{ echo "netbench failed; see its log:" >&2; tail -20 "$work/netbench.log" >&2; exit 1; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

for driver in builtin netstack; do
	for rep in $(seq "$REPS"); do
		port=$((26200 + rep))
		# A published port accepts before the guest listens (as with
		# slirp4netns), so wait for the server's own "listening" line.
		rm -f "$work/srv.log"
		"$work/netns-run" -p "127.0.0.1:$port:5201" --port-driver="$driver" -- \
			iperf3 -s -1 -p 5201 --forceflush > "$work/srv.log" 2>&1 &
		nr=$!
		for _ in $(seq 200); do
			grep -q "listening" "$work/srv.log" 2>/dev/null && break
			sleep 0.02
		done
		iperf3 -c 127.0.0.1 -p "$port" -t "$DUR" -J > "$work/$driver.$rep.json" 2>/dev/null || true
		kill "$nr" 2>/dev/null || true
		wait "$nr" 2>/dev/null || true
		jq '.end.sum_received.bits_per_second / 1e9' "$work/$driver.$rep.json" >> "$work/$driver.gbps" 2>/dev/null || true
	done
	printf 'netns-run-%s\ttcp_in_gbps\t%s\n' "$driver" "$(median < "$work/$driver.gbps")" >> "$tsv"
done

veth=$(awk -F'\t' '$1=="veth" && $2=="tcp_in_gbps" {print $3}' "$tsv" | tail -1)
echo "#### Inbound TCP through a published port — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r), DUR=${DUR}s REPS=$REPS (median)"
echo
echo "| impl | tcp_in_gbps | × veth |"
echo "|---|---:|---:|"
awk -F'\t' -v base="$veth" '$2=="tcp_in_gbps" {
	name=$1; sub(/^slirp-compatible:.*/, "usernet (API add_hostfwd, netstack path)", name)
	if (name=="slirp4netns") name="slirp4netns (API add_hostfwd)"
	if (name=="pasta") name="pasta -t"
	r = (base+0 > 0 && $3+0 > 0) ? sprintf("%.2f", $3/base) : ""
	v = ($3+0 > 0) ? sprintf("%.3g", $3) : $3
	printf "| %s | %s | %s |\n", name, v, r }' "$tsv"
echo
echo "Full netbench output for the reference rows:"
echo
cat "$work/netbench.md"
