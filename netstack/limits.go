package netstack

import "time"

// limits are the bounds a guest's flows live within. The defaults are the
// constants next to the code they bound; tests shrink them through
// Config.limits so that a bound is reached in a few flows and seconds.
type limits struct {
	tcpFlows  int64
	udpFlows  int
	udp       flowTimeouts
	pingFlows int
	ping      flowTimeouts
	keepalive tcpKeepalive
	// tcpBuffers is the budget for all TCP flows' buffers (budget.go).
	tcpBuffers int64
}

func defaultLimits() limits {
	return limits{
		tcpFlows:   maxTCPFlows,
		udpFlows:   maxUDPFlows,
		udp:        flowTimeouts{unreplied: udpUnrepliedTimeout, replied: udpUnrepliedTimeout, assured: udpAssuredTimeout},
		pingFlows:  maxPingFlows,
		ping:       flowTimeouts{unreplied: pingIdle, replied: pingIdle, assured: pingIdle},
		keepalive:  tcpKeepalive{idle: keepaliveIdle, interval: keepaliveInterval, count: keepaliveCount},
		tcpBuffers: tcpBufferBudget,
	}
}

// tcpKeepalive is the keepalive of the stack's side of guest TCP flows.
type tcpKeepalive struct {
	idle, interval time.Duration
	count          int
}
