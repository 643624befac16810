package netstack

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/ktcpnat"
)

// The kernel TCP path's flows move into the guest kernel's own translation
// (package ktcpnat) once they are busy, and out of it after their linger.

// A flow's place in the guest kernel's maps (ktcpFlow.nat).
const (
	natNone   int32 = iota
	natAdding       // translateInKernel is at work
	natIn           // the entries are in, or may be (an answer lost)
	natOver         // translateHere ran: no entries may stay
)

// translateInKernel hands f's translation to the guest's kernel, if it can
// take it, once the relay found the flow busy (sockrelay.Loop): a connection
// that carries one request and its answer is over before the two netlink
// transactions (in, and out at the end) would pay off. It runs on a
// goroutine of its own, so the flow's linger may end meanwhile: then it
// takes the entries out again itself.
func (k *kernelTCP) translateInKernel(f *ktcpFlow) {
	if k.nat == nil || k.natOff[f.family()].Load() || !f.nat.CompareAndSwap(natNone, natAdding) {
		return
	}
	nf := f.natFlow()
	err := k.nat.Add(nf)
	if errors.Is(err, unix.EEXIST) {
		// The guest reused the addresses of a connection whose
		// translation lingers (translateHere): the guest's side is
		// ours now.
		if err = k.nat.Remove(nf, ktcpnat.Out); err == nil {
			err = k.nat.Add(nf)
		}
	}
	// Unless the kernel said no, the entries may be in (an answer
	// lost): removing them at the end is harmless if not.
	in := err == nil || !errors.Is(err, unix.EEXIST) && !errors.Is(err, unix.ENFILE)
	next := natNone
	if in {
		next = natIn
	}
	if !f.nat.CompareAndSwap(natAdding, next) && in {
		k.untranslate(f)
	}
	if err != nil {
		k.natFailed(f, err)
		return
	}
	k.s.counters.tcpKernelNATTotal.Add(1)
}

// family indexes kernelTCP.natOff.
func (f *ktcpFlow) family() int {
	if f.key.guest.Addr().Is4() {
		return 0
	}
	return 1
}

func (f *ktcpFlow) natFlow() ktcpnat.Flow {
	return ktcpnat.Flow{Guest: f.key.guest, Remote: f.key.remote, Fake: f.fake, Listener: f.listener}
}

// natFailed leaves f on the TAP. A full map frees up as flows end, and
// memory may; anything else (the guest deleted the table, the kernel
// refuses us, the broker is gone or mute) lasts, and no flow tries again.
func (k *kernelTCP) natFailed(f *ktcpFlow, err error) {
	transient := false
	for _, e := range []error{unix.ENFILE, unix.EEXIST, unix.ENOMEM, unix.ENOBUFS, unix.EBUSY} {
		transient = transient || errors.Is(err, e)
	}
	if !transient && k.natOff[f.family()].CompareAndSwap(false, true) {
		k.s.log.Debug("tcp: the guest's kernel does not translate flows of this family; the helper does", "ipv6", f.family() == 1, "err", err)
		return
	}
	k.s.log.Debug("tcp: the guest's kernel does not translate the flow; the helper does", "src", f.key.guest, "dst", f.key.remote, "err", err)
}

// translateHere takes f's translation back from the guest's kernel once its
// linger ended (the last segments of a close go the kernel's way too: the
// TAP may be congested, and an orphaned listener socket whose ACKs come late
// is reset). The guest's side stays if a new flow on the same addresses took
// it over (translateInKernel): the rules leave SYNs alone, so a new
// connection always reaches divert.
func (k *kernelTCP) translateHere(f *ktcpFlow) {
	if f.nat.Swap(natOver) == natIn {
		k.untranslate(f)
	}
}

// untranslate removes f's entries from the guest kernel's maps: the
// guest's side only if no other flow took its addresses over.
func (k *kernelTCP) untranslate(f *ktcpFlow) {
	parts := ktcpnat.Back
	if v, ok := k.byGuest.Load(f.key); !ok || v == f {
		parts = ktcpnat.Both
	}
	// The parts are decided here, before the caller forgets the flow.
	k.removeTranslation(f, parts)
}

// removeTranslation removes parts of f's entries from the guest kernel's
// maps, on a goroutine of its own: with a broker, a removal may take
// seconds, and the deferred work of every other flow would wait behind it.
func (k *kernelTCP) removeTranslation(f *ktcpFlow, parts ktcpnat.Parts) {
	nf := f.natFlow()
	k.s.flows.spawn(func() {
		if err := k.nat.Remove(nf, parts); err != nil && !errors.Is(err, os.ErrClosed) {
			k.s.log.Debug("tcp: removing a flow's translation from the guest's kernel", "src", nf.Guest, "dst", nf.Remote, "err", err)
		}
	})
}
