package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// tcpConns makes COUNT short connections to an echo server, PARALLEL at a
// time (connect, 1 byte each way, close), and fails unless all succeed.
func tcpConns(args []string) error {
	if err := needArgs(args, 3); err != nil {
		return err
	}
	count, err1 := strconv.Atoi(args[1])
	par, err2 := strconv.Atoi(args[2])
	if err := errors.Join(err1, err2); err != nil || par < 1 {
		return fmt.Errorf("bad COUNT or PARALLEL")
	}
	start := time.Now()
	jobs := make(chan struct{}, count)
	for i := 0; i < count; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	var mu sync.Mutex
	var failed int
	var first error
	var wg sync.WaitGroup
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1)
			for range jobs {
				err := func() error {
					c, err := net.DialTimeout("tcp", args[0], 20*time.Second)
					if err != nil {
						return err
					}
					defer c.Close()
					_ = c.SetDeadline(time.Now().Add(20 * time.Second))
					if _, err := c.Write([]byte{'x'}); err != nil {
						return err
					}
					_, err = c.Read(buf)
					return err
				}()
				if err != nil {
					mu.Lock()
					failed++
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	fmt.Printf("conns=%d failed=%d seconds=%.2f\n", count, failed, time.Since(start).Seconds())
	if failed > 0 {
		return fmt.Errorf("%d of %d connections failed; first: %w", failed, count, first)
	}
	return nil
}

// spray sends one TCP SYN (a non-blocking connect, abandoned) or one UDP
// datagram to each of COUNT ports of HOST, as fast as it can: a flood for
// the helper's limits, not a connection test.
func spray(args []string) error {
	if err := needArgs(args, 4); err != nil {
		return err
	}
	first, err1 := strconv.Atoi(args[2])
	count, err2 := strconv.Atoi(args[3])
	ip := net.ParseIP(args[1]).To4()
	if err := errors.Join(err1, err2); err != nil || ip == nil {
		return fmt.Errorf("bad HOST, FIRSTPORT or COUNT")
	}
	typ := syscall.SOCK_DGRAM
	if args[0] == "tcp" {
		typ = syscall.SOCK_STREAM
	}
	sent := 0
	for i := 0; i < count; i++ {
		port := first + i%(65536-first)
		fd, err := syscall.Socket(syscall.AF_INET, typ|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		sa := &syscall.SockaddrInet4{Port: port, Addr: [4]byte(ip)}
		if typ == syscall.SOCK_DGRAM {
			err = syscall.Sendto(fd, []byte("flood"), 0, sa)
		} else {
			// Close at once with linger 0: the SYN is out, no state stays.
			err = syscall.Connect(fd, sa)
			_ = syscall.SetsockoptLinger(fd, syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1})
			if errors.Is(err, syscall.EINPROGRESS) {
				err = nil
			}
		}
		syscall.Close(fd)
		if err == nil {
			sent++
		}
	}
	fmt.Printf("sent=%d\n", sent)
	return nil
}

// requestResponse measures 1-byte request/response round trips on one
// TCP connection to an echo server for SECONDS and prints p50 and p99.
func requestResponse(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	secs, err := strconv.ParseFloat(args[1], 64)
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := []byte{'x'}
	var samples []time.Duration
	end := time.Now().Add(time.Duration(secs * float64(time.Second)))
	for i := 0; time.Now().Before(end); i++ {
		start := time.Now()
		if _, err := c.Write(buf); err != nil {
			return err
		}
		if _, err := c.Read(buf); err != nil {
			return err
		}
		if i >= 100 { // warm-up
			samples = append(samples, time.Since(start))
		}
	}
	if len(samples) == 0 {
		return fmt.Errorf("no samples")
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	us := func(q float64) float64 { return float64(samples[int(q*float64(len(samples)-1))].Nanoseconds()) / 1e3 }
	fmt.Printf("n=%d p50_us=%.1f p99_us=%.1f\n", len(samples), us(0.5), us(0.99))
	return nil
}

// holdConns opens COUNT connections to an echo server, echoes one byte on
// each so every flow has carried data, prints "held N" and keeps them open
// for SECONDS: the benchmark reads the helper's memory meanwhile.
func holdConns(args []string) error {
	if err := needArgs(args, 3); err != nil {
		return err
	}
	count, err1 := strconv.Atoi(args[1])
	secs, err2 := strconv.ParseFloat(args[2], 64)
	if err := errors.Join(err1, err2); err != nil {
		return err
	}
	conns := make([]net.Conn, 0, count)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	one := make([]byte, 1)
	for i := 0; i < count; i++ {
		c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		conns = append(conns, c)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, one); err != nil || one[0] != byte(i) {
			return fmt.Errorf("connection %d: echo %v, %v", i, one, err)
		}
	}
	fmt.Printf("held %d\n", len(conns))
	time.Sleep(time.Duration(secs * float64(time.Second)))
	return nil
}
