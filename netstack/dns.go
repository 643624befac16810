package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

const (
	// dnsTryTimeout is how long one upstream gets to answer a query
	// before the next one is asked.
	dnsTryTimeout = 2 * time.Second
	// dnsFlowIdle ends a guest's DNS socket flow; resolvers use a fresh
	// source port per lookup, so flows are short.
	dnsFlowIdle = 10 * time.Second
	// dnsMaxPending bounds queries in flight on one guest flow.
	dnsMaxPending = 16
	// dnsMaxMessage is the largest DNS message over UDP (EDNS0 allows up
	// to 64 KiB).
	dnsMaxMessage = 65535
)

var errNoUpstream = errors.New("no DNS upstream configured")

// serveDNS answers the queries of one guest UDP flow to the DNS address by
// relaying each to the upstreams in order. Queries are handled concurrently:
// resolvers send A and AAAA on the same socket at once.
func (s *Stack) serveDNS(guest *gonet.UDPConn) {
	var wg sync.WaitGroup
	defer func() {
		guest.Close()
		wg.Wait()
	}()
	stop := context.AfterFunc(s.ctx, func() { guest.Close() })
	defer stop()

	pending := make(chan struct{}, dnsMaxPending)
	buf := make([]byte, dnsMaxMessage)
	for {
		_ = guest.SetReadDeadline(time.Now().Add(dnsFlowIdle))
		n, err := guest.Read(buf)
		if err != nil {
			return
		}
		if n < 12 {
			continue // shorter than a DNS header
		}
		select {
		case pending <- struct{}{}:
		default:
			s.log.Debug("dns: too many pending queries on one flow; dropping")
			continue
		}
		query := append([]byte(nil), buf[:n]...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-pending }()
			resp, err := s.exchangeUDP(query)
			if err != nil {
				s.log.Debug("dns query failed", "err", err)
				return
			}
			_, _ = guest.Write(resp)
		}()
	}
}

// exchangeUDP sends query to each upstream in turn and returns the first
// answer whose ID matches.
func (s *Stack) exchangeUDP(query []byte) ([]byte, error) {
	if len(s.cfg.DNSUpstreams) == 0 {
		return nil, errNoUpstream
	}
	var errs []error
	for _, up := range s.cfg.DNSUpstreams {
		resp, err := exchangeOne(s.ctx, up.String(), query)
		if err == nil {
			return resp, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", up, err))
	}
	return nil, errors.Join(errs...)
}

func exchangeOne(ctx context.Context, server string, query []byte) ([]byte, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	_ = conn.SetDeadline(time.Now().Add(dnsTryTimeout))
	if _, err := conn.Write(query); err != nil {
		return nil, err
	}
	buf := make([]byte, dnsMaxMessage)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return nil, err
		}
		if n >= 12 && buf[0] == query[0] && buf[1] == query[1] {
			return buf[:n], nil
		}
	}
}

// dialDNSUpstreamTCP connects to the first upstream that accepts TCP.
func (s *Stack) dialDNSUpstreamTCP() (*net.TCPConn, error) {
	if len(s.cfg.DNSUpstreams) == 0 {
		return nil, errNoUpstream
	}
	var errs []error
	for _, up := range s.cfg.DNSUpstreams {
		d := net.Dialer{Timeout: dnsTryTimeout}
		c, err := d.DialContext(s.ctx, "tcp", up.String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}
