package main

import (
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// serveTCP listens on addr, says so on stdout, and serves each connection
// with handle in a goroutine of its own (handle closes nothing; the
// connection is closed after it).
func serveTCP(addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Printf("listening %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			handle(c)
		}()
	}
}

func tcpEchoServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	return serveTCP(args[0], func(c net.Conn) {
		_, _ = io.Copy(c, c)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	})
}

func udpEchoServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	pc, err := net.ListenPacket("udp", args[0])
	if err != nil {
		return err
	}
	fmt.Printf("listening %s\n", pc.LocalAddr())
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		_, _ = pc.WriteTo(buf[:n], from)
	}
}

// dnsServer answers A queries for the given names over UDP and TCP and
// NXDOMAIN for everything else.
func dnsServer(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("want ADDR NAME=IPV4 [NAME=IPV4]")
	}
	records := map[string]net.IP{}
	for _, kv := range args[1:] {
		name, ip, ok := strings.Cut(kv, "=")
		if !ok || net.ParseIP(ip) == nil {
			return fmt.Errorf("bad record %q", kv)
		}
		records[dns.Fqdn(strings.ToLower(name))] = net.ParseIP(ip)
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		resp := new(dns.Msg)
		resp.SetReply(req)
		resp.Authoritative = true
		for _, q := range req.Question {
			ip, ok := records[strings.ToLower(q.Name)]
			if !ok {
				resp.Rcode = dns.RcodeNameError
				continue
			}
			if q.Qtype == dns.TypeA {
				resp.Answer = append(resp.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
					A:   ip.To4(),
				})
			}
		}
		_ = w.WriteMsg(resp)
	})
	errs := make(chan error, 2)
	started := make(chan struct{}, 2)
	for _, proto := range []string{"udp", "tcp"} {
		srv := &dns.Server{Addr: args[0], Net: proto, Handler: handler,
			NotifyStartedFunc: func() { started <- struct{}{} }}
		go func() { errs <- srv.ListenAndServe() }()
	}
	for i := 0; i < 2; i++ {
		select {
		case <-started:
		case err := <-errs:
			return err
		case <-time.After(10 * time.Second):
			return fmt.Errorf("dns server did not start")
		}
	}
	fmt.Printf("listening %s\n", args[0])
	return <-errs
}
