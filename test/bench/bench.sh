#!/usr/bin/env bash
# Side-by-side benchmark: netns-run and usernet against slirp4netns (MTU
# 65520 and 1500), pasta, rootlesskit's builtin port driver, a veth pair
# and host loopback, in one run. Prints markdown tables (median of REPS)
# with ratios against veth.
#
#   sudo test/bench/bench.sh > bench.md           # DUR=5 REPS=3, ~12 min
#   QUICK=1 sudo test/bench/bench.sh > bench.md   # DUR=2 REPS=1, ~3 min
#
# The reference rows, and usernet's (driven exactly like slirp4netns), come
# from ../shared/bench/netbench.sh; the netns-run rows are measured here
# with the same tools and parameters. Traffic stays on loopback and in the
# namespaces the scripts create.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
netbench=${NETBENCH:-$top/../shared/bench/netbench.sh}
export PATH="$PATH:/usr/local/go/bin"
[ "$(id -u)" = 0 ] || { echo "run as root (the harness creates namespaces)" >&2; exit 1; }
for t in iperf3 jq bc; do command -v "$t" >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 1; }; done
if [ "${QUICK:-}" = 1 ]; then DUR=${DUR:-2}; REPS=${REPS:-1}; else DUR=${DUR:-5}; REPS=${REPS:-3}; fi
export DUR REPS

work=$(mktemp -d)
trap 'pkill -f "$work/" 2>/dev/null || true; rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$top" && go build -o "$work/netns-run" ./cmd/netns-run && go build -o "$work/usernet" ./cmd/usernet &&
	go build -o "$work/nettool" ./test/nettool)
log() { echo "[$(date +%T)] $*" >&2; }

tsv=$work/results.tsv
IMPLS=${IMPLS:-"loopback veth slirp4netns slirp4netns-1500 pasta rootlesskit-builtin slirp-compatible:$work/usernet"}
log "reference rows: netbench.sh IMPLS=\"$IMPLS\""
IMPLS="$IMPLS" RESULTS=$tsv bash "$netbench" > "$work/netbench.md" 2> "$work/netbench.log" ||
	{ echo "netbench failed; its log:" >&2; tail -20 "$work/netbench.log" >&2; exit 1; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
res() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$tsv"; }
nr=$work/netns-run
# No DNS is needed: the forwarder points at the discard port on loopback,
# so nothing can reach the machine's resolver.
nrflags=(--dns-upstream 127.0.0.1:9 --disable-ipv6)

# Outbound: the guest to the host's 127.0.0.1 through 10.0.2.2.
iperf3 -s -B 127.0.0.1 -p 16201 >/dev/null 2>&1 &
srv=$!
"$work/nettool" tcp-echo-server 127.0.0.1:16301 >/dev/null 2>&1 &
echo_srv=$!
sleep 0.3
for mtu in 65520 1500; do
	name=netns-run
	[ "$mtu" = 1500 ] && name=netns-run-1500
	: > "$work/out.$mtu"
	for _ in $(seq "$REPS"); do
		"$nr" "${nrflags[@]}" --mtu "$mtu" -- iperf3 -c 10.0.2.2 -p 16201 -t "$DUR" -J 2>/dev/null |
			jq '.end.sum_received.bits_per_second / 1e9' >> "$work/out.$mtu" || true
	done
	res "$name" tcp_out_gbps "$(median < "$work/out.$mtu")"
	log "$name tcp_out $(tr '\n' ' ' < "$work/out.$mtu")"
done
: > "$work/rr50"
: > "$work/rr99"
for _ in $(seq "$REPS"); do
	line=$("$nr" "${nrflags[@]}" -- "$work/nettool" rr 10.0.2.2:16301 "${RR_DUR:-3}")
	echo "$line" | sed -E 's/.*p50_us=([0-9.]+).*/\1/' >> "$work/rr50"
	echo "$line" | sed -E 's/.*p99_us=([0-9.]+).*/\1/' >> "$work/rr99"
done
res netns-run rr_out_p50_us "$(median < "$work/rr50")"
res netns-run rr_out_p99_us "$(median < "$work/rr99")"
# The same under an egress policy of 10,000 rules (names, wildcards, ranges
# of both families, ports; the last one admits the echo server), run
# alternately with the plain one so that both see the same machine.
awk 'BEGIN {
	for (i = 0; i < 9999; i++) {
		m = i % 5
		if (m == 0) printf "allow host%d.example.com:443\n", i
		if (m == 1) printf "allow *.svc%d.example.net\n", i
		if (m == 2) printf "allow 10.%d.%d.0/24:8000-8099/tcp\n", int(i / 256) % 256, i % 256
		if (m == 3) printf "deny 172.%d.%d.%d\n", 16 + int(i / 65536) % 16, int(i / 256) % 256, i % 256
		if (m == 4) printf "allow [2001:db8:%x::/48]:53/udp\n", i
	}
	print "allow 127.0.0.1:16301"
}' > "$work/policy"
: > "$work/cps"
: > "$work/cps_policy"
for _ in $(seq "$REPS"); do
	for out in cps cps_policy; do
		extra=()
		[ "$out" = cps_policy ] && extra=(--policy "$work/policy")
		"$nr" "${nrflags[@]}" "${extra[@]}" -- "$work/nettool" tcp-conns 10.0.2.2:16301 "${CONN_N:-2000}" 1 |
			sed -E 's/conns=([0-9]+) failed=[0-9]+ seconds=([0-9.]+)/\1 \2/' | awk '$2 > 0 {print $1 / $2}' >> "$work/$out"
	done
done
res netns-run conn_out_per_s "$(median < "$work/cps")"
res netns-run conn_out_10k_rules_per_s "$(median < "$work/cps_policy")"
log "netns-run conn/s without policy $(tr '\n' ' ' < "$work/cps"); with 10,000 rules $(tr '\n' ' ' < "$work/cps_policy")"

# Helper memory, netns-run and its packet engine (the child named
# netns-engine) together: idle, and while the namespace holds 1000
# established connections through it. Two processes of one binary share
# its pages, so their proportional set sizes (PSS) are summed: adding RSS
# would count the shared pages twice.
rss_of() {
	local p total=0
	for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
		[ "$p" = "$1" ] || [ "$(cat "/proc/$p/comm" 2>/dev/null)" = netns-engine ] || continue
		total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")))
	done
	echo "$total"
}
"$nr" "${nrflags[@]}" -- sleep 2 &
pid=$!
sleep 1
res netns-run rss_idle_kb "$(rss_of "$pid")"
wait "$pid" || true
held=$work/held.out
"$nr" "${nrflags[@]}" -- "$work/nettool" hold 10.0.2.2:16301 1000 3 > "$held" 2>&1 &
pid=$!
for _ in $(seq 400); do
	grep -q '^held' "$held" && break
	sleep 0.05
done
if grep -q '^held 1000' "$held"; then
	res netns-run rss_1000_conns_kb "$(rss_of "$pid")"
else
	log "hold 1000 connections failed: $(cat "$held")"
fi
wait "$pid" || true
kill "$srv" "$echo_srv" 2>/dev/null || true

# Inbound through a published port, both drivers.
for driver in builtin netstack; do
	: > "$work/in.$driver"
	for rep in $(seq "$REPS"); do
		port=$((26200 + rep))
		# A published port accepts before the guest listens, so wait for
		# the server's own "listening" line.
		rm -f "$work/srv.log"
		"$nr" "${nrflags[@]}" -p "127.0.0.1:$port:5201" --port-driver="$driver" -- \
			iperf3 -s -1 -p 5201 --forceflush > "$work/srv.log" 2>&1 &
		pid=$!
		for _ in $(seq 200); do
			grep -q "listening" "$work/srv.log" 2>/dev/null && break
			sleep 0.02
		done
		iperf3 -c 127.0.0.1 -p "$port" -t "$DUR" -J 2>/dev/null |
			jq '.end.sum_received.bits_per_second / 1e9' >> "$work/in.$driver" || true
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	res "netns-run -p ($driver)" tcp_in_gbps "$(median < "$work/in.$driver")"
	log "netns-run $driver tcp_in $(tr '\n' ' ' < "$work/in.$driver")"
done

# Parallel TCP streams guest -> host (nettool stream: the large test
# machine has no iperf3), for each helper and for host loopback itself.
"$work/nettool" stream-sink 127.0.0.1:16401 >/dev/null 2>&1 &
sink=$!
sleep 0.3
streams_run() { # impl cmd...: one row per stream count
	local impl=$1 n line
	shift
	for n in 1 8 16; do
		line=$("$@" "$work/nettool" stream "$STREAM_ADDR" "$n" "$DUR" 2>/dev/null) || true
		res "$impl" "streams_${n}_gbps" "$(echo "$line" | sed -nE 's/.*gbps=([0-9.]+).*/\1/p')"
	done
}
in_userns() { # helper-setup-fn: runs the helper for a fresh namespace, then measures
	local setup=$1 impl=$2 nspid hpid
	unshare --user --map-root-user --net sleep infinity &
	nspid=$!
	for _ in $(seq 100); do
		[ "$(readlink /proc/$nspid/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break
		sleep 0.02
	done
	hpid=$("$setup" "$nspid")
	nsenter -t "$nspid" -U -n --preserve-credentials ip route del default 2>/dev/null || true
	STREAM_ADDR=10.0.2.2:16401 streams_run "$impl" nsenter -t "$nspid" -U -n --preserve-credentials
	kill "$hpid" "$nspid" 2>/dev/null || true
	wait "$hpid" "$nspid" 2>/dev/null || true
}
slirp_like() { # bin nspid: start a slirp4netns-compatible helper, print its PID once ready
	local fifo
	fifo=$(mktemp -u "$work/ready.XXXX")
	mkfifo "$fifo"
	"$1" --configure --mtu=65520 -r 3 "$2" tap0 3>"$fifo" >/dev/null 2>&1 &
	echo $!
	read -r -t 15 -N 1 _ <"$fifo" || true
}
start_slirp4netns() { slirp_like /usr/bin/slirp4netns "$1"; }
start_usernet() { slirp_like "$work/usernet" "$1"; }
start_pasta() {
	pasta -4 --config-net -a 10.0.2.100 -n 24 -g 10.0.2.2 -o 127.0.0.1 -m 65520 -t none -u none -T none -U none \
		-q --runas 0 -P "$work/pasta-streams.pid" "$1" >/dev/null 2>&1
	cat "$work/pasta-streams.pid"
}
STREAM_ADDR=127.0.0.1:16401 streams_run loopback
in_userns start_slirp4netns slirp4netns
command -v pasta >/dev/null && in_userns start_pasta pasta
in_userns start_usernet "slirp-compatible:$work/usernet"
STREAM_ADDR=10.0.2.2:16401 streams_run netns-run "$nr" "${nrflags[@]}" --
kill "$sink" 2>/dev/null || true

# netns-run has no ready fd: "ready" is the command running (it prints its
# start time); "done" is back in the shell after `true`, which adds the
# kernel's removal of the TAP (about 10 ms here, in close(2)).
: > "$work/start"
: > "$work/done"
for _ in $(seq "${STARTUP_N:-10}"); do
	s=$(date +%s%N)
	t=$("$nr" "${nrflags[@]}" -- date +%s%N)
	e=$(date +%s%N)
	echo "scale=2; ($t - $s) / 1000000" | bc >> "$work/start"
	echo "scale=2; ($e - $s) / 1000000" | bc >> "$work/done"
done
res netns-run startup_ms "$(median < "$work/start")"
res netns-run run_true_ms "$(median < "$work/done")"

table() { # title metric...
	local title=$1
	shift
	echo "### $title"
	echo
	printf '| impl |'
	for m in "$@"; do printf ' %s | × veth |' "$m"; done
	echo
	printf '|---|'
	for _ in "$@"; do printf -- '---:|---:|'; done
	echo
	awk -F'\t' '{print $1}' "$tsv" | awk '!seen[$0]++' | while read -r impl; do
		printf '| %s |' "${impl/slirp-compatible:$work\/usernet/usernet}"
		for m in "$@"; do
			v=$(awk -F'\t' -v i="$impl" -v m="$m" '$1==i && $2==m {print $3}' "$tsv" | tail -1)
			b=$(awk -F'\t' -v m="$m" '$1=="veth" && $2==m {print $3}' "$tsv" | tail -1)
			if [ -z "$v" ] || [ "$v" = n/a ]; then
				printf ' n/a | |'
				continue
			fi
			r=$(awk -v v="$v" -v b="$b" 'BEGIN {if (b+0 > 0) printf "%.2f", v/b}')
			printf ' %s | %s |' "$(awk -v v="$v" 'BEGIN {if (v >= 1000) printf "%.0f", v; else printf "%.3g", v}')" "$r"
		done
		echo
	done
	echo
}
echo "## Side by side — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r), DUR=${DUR}s REPS=$REPS (median)"
echo
table "TCP throughput (Gbit/s): out = namespace → host 127.0.0.1; in = host → namespace through a published port" tcp_out_gbps tcp_in_gbps
table "TCP 1-byte request/response out of the namespace (µs)" rr_out_p50_us rr_out_p99_us
table "Connections per second (sequential; 10k_rules: netns-run under an egress policy of 10,000 rules)" conn_in_per_s conn_out_per_s conn_out_10k_rules_per_s
table "Parallel TCP streams guest → host (Gbit/s, nettool stream)" streams_1_gbps streams_8_gbps streams_16_gbps
table "Helper CPU (s per GB) and peak RSS (KiB)" cpu_out_s_per_gb cpu_in_s_per_gb peak_rss_kb
table "Helper RSS (KiB; netns-run: PSS of it and its engine): idle, and holding 1000 established connections" rss_idle_kb rss_1000_conns_kb
table "Launch to ready (ms; netns-run: until the command runs; run_true: back from \`netns-run -- true\`)" startup_ms run_true_ms
echo "netns-run rows are measured by this script (outbound through 10.0.2.2, inbound through -p with each"
echo "driver); usernet rows by netbench.sh through slirp4netns's code path. Full netbench output:"
echo
cat "$work/netbench.md"
