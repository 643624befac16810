package netstack

// limits are the bounds a guest's flows live within. The defaults are the
// constants next to the code they bound; tests shrink them through
// Config.limits so that a bound is reached in a few flows and seconds.
type limits struct {
	udpFlows  int
	udp       flowTimeouts
	pingFlows int
	ping      flowTimeouts
}

func defaultLimits() limits {
	return limits{
		udpFlows:  maxUDPFlows,
		udp:       flowTimeouts{unreplied: udpUnrepliedTimeout, replied: udpUnrepliedTimeout, assured: udpAssuredTimeout},
		pingFlows: maxPingFlows,
		ping:      flowTimeouts{unreplied: pingIdle, replied: pingIdle, assured: pingIdle},
	}
}
