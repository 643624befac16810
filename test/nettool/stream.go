package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// streamSink accepts connections and discards what they send, so that a
// stream source measures throughput without iperf3 (the large test machine
// has none).
func streamSink(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	return serveTCP(args[0], func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
}

// streamSource sends on STREAMS parallel connections for SECONDS and prints
// the aggregate rate.
func streamSource(args []string) error {
	if err := needArgs(args, 3); err != nil {
		return err
	}
	n, err1 := strconv.Atoi(args[1])
	secs, err2 := strconv.ParseFloat(args[2], 64)
	if err := errors.Join(err1, err2); err != nil || n < 1 || secs <= 0 {
		return fmt.Errorf("bad STREAMS or SECONDS")
	}
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	var total atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(time.Duration(secs * float64(time.Second)))
	errs := make(chan error, n)
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 128<<10)
			_ = c.SetWriteDeadline(deadline)
			for time.Now().Before(deadline) {
				m, err := c.Write(buf)
				total.Add(int64(m))
				if err != nil {
					var ne net.Error
					if !errors.As(err, &ne) || !ne.Timeout() {
						errs <- err
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	el := time.Since(start).Seconds()
	fmt.Printf("streams=%d bytes=%d seconds=%.2f gbps=%.2f\n", n, total.Load(), el, float64(total.Load())*8/el/1e9)
	return nil
}
