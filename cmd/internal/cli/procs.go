package cli

import (
	"os"
	"runtime"
)

// maxProcs bounds the helper's Ps on large machines: the data path has a
// TAP queue per P, and the guest's kernel spreads its flows over them.
const maxProcs = 8

// SetProcs chooses how many CPUs the helper's goroutines run on at a time,
// unless the user set GOMAXPROCS, and returns the number.
//
// With at most two CPUs available (the affinity mask and cgroup limit Go
// reports), one: a frame's path through the helper is a chain of goroutine
// hand-offs (TAP reader, gVisor's TCP processor, the relay), which on one P
// run back to back on one thread, where two Ps wake a second thread for most
// hand-offs, and the guest and host programs need the other CPU. Measured
// on 2 CPUs, same runs: connections per second 1.8x (2000 sequential: 2.2
// against 2.8 s with multi-queue), host -> guest TCP 7.8 -> 9.7-10.6
// Gbit/s, 1-byte round trips 147 against 182 us. slirp4netns and pasta are
// single-threaded as well.
//
// On larger machines one P held a single stream at two thirds of what two
// reached (16 CPUs, one TAP queue: 14 against 21 Gbit/s, flat from 2 to 16
// Ps): there the helper takes half the CPUs, up to maxProcs, and as many
// TAP queues.
func SetProcs() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0)
	}
	p := 1
	if n := runtime.GOMAXPROCS(0); n > 2 {
		p = min(n/2, maxProcs)
	}
	runtime.GOMAXPROCS(p)
	return p
}
