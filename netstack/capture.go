package netstack

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"

	"github.com/netns-run/netns-run/launcher/safefs"
)

// CaptureWriter caps a packet capture at a size: records past the cap are
// dropped whole (gVisor's sniffer writes one record per Write), and a
// failing file stops the capture instead of the stack (the sniffer panics on
// a write error).
type CaptureWriter struct {
	mu      sync.Mutex
	w       io.Writer
	max     int64
	written int64
	stopped bool
	log     *slog.Logger
}

// NewCaptureWriter caps w at max bytes (0: no cap).
func NewCaptureWriter(w io.Writer, max int64, log *slog.Logger) *CaptureWriter {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &CaptureWriter{w: w, max: max, log: log}
}

// Write implements io.Writer; it never fails.
func (c *CaptureWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return len(p), nil
	}
	if c.max > 0 && c.written+int64(len(p)) > c.max {
		c.stopped = true
		c.log.Warn("packet capture reached its size limit; later packets are not captured", "bytes", c.written)
		return len(p), nil
	}
	n, err := c.w.Write(p)
	c.written += int64(n)
	if err != nil {
		c.stopped = true
		c.log.Warn("packet capture stopped", "err", err)
	}
	return len(p), nil
}

// OpenCapture creates the pcap file at path (see safefs.CreateFile: no
// symlink followed, no file of someone else's truncated), capped at max
// bytes (0: no cap). The returned file is the caller's to close after the
// stack.
func OpenCapture(path string, max int64, log *slog.Logger) (*CaptureWriter, *os.File, error) {
	f, err := safefs.CreateFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("packet capture: %w", err)
	}
	return NewCaptureWriter(f, max, log), f, nil
}
