package cli

import (
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/portfwd"
)

// StatsWithPublished returns stats with the published-port connections
// that k (nil: none) took past the stack counted in.
func StatsWithPublished(stats func() any, k *portfwd.KernelPath) func() any {
	if k == nil {
		return stats
	}
	return func() any {
		st := stats()
		s, ok := st.(netstack.Stats)
		if !ok {
			return st
		}
		c := k.Stats()
		s.AddPublished(c.Open, c.Total, c.FromGuest, c.ToGuest)
		return s
	}
}
