package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// dnsRecord is one record the test DNS server serves.
type dnsRecord struct {
	ip    net.IP // A or AAAA
	cname string
	txt   string
	ttl   uint32
}

// dnsServer serves the records named on its command line over UDP and TCP:
//
//	NAME=IP           an A (IPv4) or AAAA (IPv6) record; repeat NAME for more
//	NAME=cname:TARGET a CNAME (A and AAAA queries follow it)
//	NAME=txt:TEXT     a TXT record
//	...@TTL           any of them with that TTL (default 60 s)
//	querylog=PATH     append "NAME TYPE" for every query received to PATH
//
// Other names are NXDOMAIN; known names without records of the type asked
// get an empty answer.
func dnsServer(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("want ADDR [querylog=PATH] NAME=VALUE[@TTL]")
	}
	records := map[string][]dnsRecord{}
	var logMu sync.Mutex
	var queryLog *os.File
	for _, kv := range args[1:] {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("bad record %q", kv)
		}
		if name == "querylog" {
			f, err := os.OpenFile(value, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
			if err != nil {
				return err
			}
			queryLog = f
			continue
		}
		r := dnsRecord{ttl: 60}
		if v, ttl, ok := strings.Cut(value, "@"); ok {
			n, err := strconv.ParseUint(ttl, 10, 32)
			if err != nil {
				return fmt.Errorf("bad TTL in %q", kv)
			}
			value, r.ttl = v, uint32(n)
		}
		switch {
		case strings.HasPrefix(value, "cname:"):
			r.cname = dns.Fqdn(strings.ToLower(strings.TrimPrefix(value, "cname:")))
		case strings.HasPrefix(value, "txt:"):
			r.txt = strings.TrimPrefix(value, "txt:")
		default:
			if r.ip = net.ParseIP(value); r.ip == nil {
				return fmt.Errorf("bad record %q", kv)
			}
		}
		key := dns.Fqdn(strings.ToLower(name))
		records[key] = append(records[key], r)
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		resp := new(dns.Msg)
		resp.SetReply(req)
		resp.Authoritative = true
		for _, q := range req.Question {
			if queryLog != nil {
				logMu.Lock()
				fmt.Fprintf(queryLog, "%s %s\n", strings.ToLower(strings.TrimSuffix(q.Name, ".")), dns.TypeToString[q.Qtype])
				logMu.Unlock()
			}
			name := strings.ToLower(q.Name)
			if _, ok := records[name]; !ok {
				resp.Rcode = dns.RcodeNameError
				continue
			}
			resp.Answer = append(resp.Answer, answerRecords(records, q.Name, q.Qtype, 8)...)
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

// answerRecords are the records of owner (as asked) for qtype, following
// CNAMEs at most depth times.
func answerRecords(records map[string][]dnsRecord, owner string, qtype uint16, depth int) []dns.RR {
	var out []dns.RR
	for _, r := range records[strings.ToLower(owner)] {
		hdr := func(t uint16) dns.RR_Header {
			return dns.RR_Header{Name: owner, Rrtype: t, Class: dns.ClassINET, Ttl: r.ttl}
		}
		switch {
		case r.cname != "":
			out = append(out, &dns.CNAME{Hdr: hdr(dns.TypeCNAME), Target: r.cname})
			if depth > 0 && qtype != dns.TypeCNAME {
				out = append(out, answerRecords(records, r.cname, qtype, depth-1)...)
			}
		case r.txt != "" && qtype == dns.TypeTXT:
			out = append(out, &dns.TXT{Hdr: hdr(dns.TypeTXT), Txt: []string{r.txt}})
		case r.ip != nil && r.ip.To4() != nil && qtype == dns.TypeA:
			out = append(out, &dns.A{Hdr: hdr(dns.TypeA), A: r.ip.To4()})
		case r.ip != nil && r.ip.To4() == nil && qtype == dns.TypeAAAA:
			out = append(out, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: r.ip})
		}
	}
	return out
}
