#!/usr/bin/env bash
# Scaling with cores: parallel TCP streams guest -> host through netns-run
# for several GOMAXPROCS settings (one TAP queue per P), next to host
# loopback, plus the 1-byte round trip. Meant for the large test machine,
# which has no Go toolchain and no iperf3: build static binaries here,
#
#   CGO_ENABLED=1 go build -tags netgo,osusergo -ldflags '-extldflags -static' -o bin/netns-run ./cmd/netns-run
#   CGO_ENABLED=0 go build -o bin/nettool ./test/nettool
#
# and run there, as root, from the repository root: test/bench/cores.sh bin
# (nothing built is committed; bin/ is ignored). Traffic stays on loopback
# and in the namespaces netns-run creates. DUR (s per run, default 4),
# PROCS (default "default 1 2 4 8 16").
set -euo pipefail
bin=${1:?usage: cores.sh BINDIR}
DUR=${DUR:-4}
PROCS=${PROCS:-"default 1 2 4 8 16"}
nr=$bin/netns-run
nt=$bin/nettool
[ -x "$nr" ] && [ -x "$nt" ] || { echo "need $nr and $nt" >&2; exit 1; }
[ -e /dev/net/tun ] || { echo "no /dev/net/tun" >&2; exit 1; }
chmod 0666 /dev/net/tun 2>/dev/null || true

"$nt" stream-sink 127.0.0.1:16401 >/dev/null 2>&1 &
sink=$!
"$nt" tcp-echo-server 127.0.0.1:16301 >/dev/null 2>&1 &
echo_srv=$!
trap 'kill $sink $echo_srv 2>/dev/null || true' EXIT
sleep 0.3
flags=(--dns-upstream 127.0.0.1:9 --disable-ipv6)
gbps() { sed -nE 's/.*gbps=([0-9.]+).*/\1/p'; }

echo "# $(nproc) CPUs, kernel $(uname -r), DUR=${DUR}s"
echo
echo "| setup | 1 stream | 8 streams | 16 streams | RR p50 us | RR p99 us |"
echo "|---|---:|---:|---:|---:|---:|"
row="| host loopback |"
for n in 1 8 16; do row+=" $("$nt" stream 127.0.0.1:16401 "$n" "$DUR" | gbps) |"; done
rr=$("$nt" rr 127.0.0.1:16301 3)
echo "$row $(sed -nE 's/.*p50_us=([0-9.]+).*/\1/p' <<<"$rr") | $(sed -nE 's/.*p99_us=([0-9.]+).*/\1/p' <<<"$rr") |"
for p in $PROCS; do
	env=()
	[ "$p" != default ] && env=(GOMAXPROCS="$p")
	row="| netns-run GOMAXPROCS=$p |"
	for n in 1 8 16; do
		row+=" $(env "${env[@]}" "$nr" "${flags[@]}" -- "$nt" stream 10.0.2.2:16401 "$n" "$DUR" | gbps) |"
	done
	rr=$(env "${env[@]}" "$nr" "${flags[@]}" -- "$nt" rr 10.0.2.2:16301 3)
	echo "$row $(sed -nE 's/.*p50_us=([0-9.]+).*/\1/p' <<<"$rr") | $(sed -nE 's/.*p99_us=([0-9.]+).*/\1/p' <<<"$rr") |"
done
