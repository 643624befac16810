package netstack

import (
	"context"
	"sync"
	"time"
)

// Flows' deferred work, each kind a fixed delay after it was queued.
const (
	// laterAnswer: give the flow to the stack if the listener has not
	// answered its SYN.
	laterAnswer = iota
	// laterReap: end a flow the listener answered but never accepted.
	laterReap
	// laterUnmap: forget a closed flow's translation and hold its port.
	laterUnmap
	// laterForget: forget a flow handed to the stack.
	laterForget
	laterKinds
)

var laterDelays = [laterKinds]time.Duration{
	laterAnswer: ktcpAnswerTimeout,
	laterReap:   tcpDialTimeout - ktcpAnswerTimeout,
	laterUnmap:  ktcpLinger,
	laterForget: ktcpHandoffHold,
}

// run does the deferred work of kind on f.
func (k *kernelTCP) run(kind int, f *ktcpFlow) {
	switch kind {
	case laterAnswer:
		if f.answer.CompareAndSwap(ktcpUnanswered, ktcpGivenUp) {
			k.giveUp(f)
		} else if f.state.Load() == int32(ktcpOpen) {
			k.later.add(laterReap, f)
		}
	case laterReap:
		k.finish(f, ktcpOpen)
	case laterUnmap:
		k.translateHere(f)
		k.byGuest.CompareAndDelete(f.key, f)
		k.hold(f.fake)
		k.byFake.CompareAndDelete(f.fake, f)
	case laterForget:
		k.byGuest.CompareAndDelete(f.key, f)
		k.handoffs.Delete(f.key)
	}
}

// flowQueues hold the flows' deferred work in order of time, one queue per
// kind (each kind has one delay, so each queue is in order), for one
// goroutine to run: a timer per flow kept every flow's memory for its whole
// delay, and connections opened by the thousand per second held tens of
// megabytes.
type flowQueues struct {
	mu     sync.Mutex
	queues [laterKinds][]queuedFlow
}

type queuedFlow struct {
	at time.Time
	f  *ktcpFlow
}

func (q *flowQueues) add(kind int, f *ktcpFlow) {
	q.mu.Lock()
	q.queues[kind] = append(q.queues[kind], queuedFlow{time.Now().Add(laterDelays[kind]), f})
	q.mu.Unlock()
}

// due takes the work that is due by now.
func (q *flowQueues) due(now time.Time, out []queuedFlow, kinds []int) ([]queuedFlow, []int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for kind := range q.queues {
		i := 0
		for ; i < len(q.queues[kind]) && !now.Before(q.queues[kind][i].at); i++ {
			out = append(out, q.queues[kind][i])
			kinds = append(kinds, kind)
		}
		clear(q.queues[kind][:i])
		q.queues[kind] = q.queues[kind][i:]
	}
	return out, kinds
}

// ktcpTick is how often the deferred work is looked at.
const ktcpTick = 250 * time.Millisecond

// runLater does the flows' deferred work until ctx ends.
func (k *kernelTCP) runLater(ctx context.Context) {
	t := time.NewTicker(ktcpTick)
	defer t.Stop()
	var work []queuedFlow
	var kinds []int
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			work, kinds = k.later.due(now, work[:0], kinds[:0])
			for i, w := range work {
				k.run(kinds[i], w.f)
			}
			clear(work)
		}
	}
}
