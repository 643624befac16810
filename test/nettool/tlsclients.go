package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"strconv"
	"syscall"
	"time"
)

// tlsEchoServer serves TLS with a fresh self-signed certificate (for any
// name) and echoes what each client sends.
func tlsEchoServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "nettool"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	ln, err := tls.Listen("tcp", args[0], cfg)
	if err != nil {
		return err
	}
	return serveConns(ln, echo)
}

// isReset reports whether err is the peer resetting the connection (or
// closing it before answering).
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE)
}

// tlsCheck connects to ADDR with server name SNI (after waiting DELAY
// once connected, if given), echoes BYTES through the TLS connection and
// prints the sha256 of both ways, or "reset" if the connection was reset
// before the handshake completed.
func tlsCheck(args []string) error {
	if len(args) != 3 && len(args) != 4 {
		return fmt.Errorf("want ADDR SNI BYTES [DELAY]")
	}
	size, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	var delay time.Duration
	if len(args) == 4 {
		if delay, err = time.ParseDuration(args[3]); err != nil {
			return err
		}
	}
	raw, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	time.Sleep(delay)
	_ = raw.SetDeadline(time.Now().Add(time.Minute))
	c := tls.Client(raw, &tls.Config{ServerName: args[1], InsecureSkipVerify: true})
	if err := c.Handshake(); err != nil {
		if isReset(err) {
			fmt.Println("reset")
			return nil
		}
		return fmt.Errorf("handshake: %w", err)
	}
	msg := make([]byte, size)
	mrand.NewChaCha8([32]byte{7}).Read(msg)
	go func() { _, _ = c.Write(msg) }()
	got := make([]byte, size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	s, r := sha256.Sum256(msg), sha256.Sum256(got)
	fmt.Printf("tls sni=%s bytes=%d sent_sha256=%x recv_sha256=%x\n", args[1], size, s, r)
	if s != r {
		return errors.New("echo differs")
	}
	return nil
}

// httpCheck sends a GET request with Host HOST to an echo server at ADDR
// and prints "http ok" when it comes back, or "reset".
func httpCheck(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	req := []byte("GET / HTTP/1.1\r\nHost: " + args[1] + "\r\nUser-Agent: nettool\r\n\r\n")
	if _, err := c.Write(req); err != nil {
		if isReset(err) {
			fmt.Println("reset")
			return nil
		}
		return err
	}
	got := make([]byte, len(req))
	if _, err := io.ReadFull(c, got); err != nil {
		if isReset(err) {
			fmt.Println("reset")
			return nil
		}
		return err
	}
	if !bytes.Equal(got, req) {
		return errors.New("echo differs")
	}
	fmt.Println("http ok")
	return nil
}
