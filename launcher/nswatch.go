package launcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// procPollInterval is how often a /proc namespace path is checked: procfs
// sends no inotify events when a process exits.
const procPollInterval = time.Second

// WatchRemoval returns a channel closed once path (a network namespace
// file: a bind mount such as podman's, or /proc/PID/ns/net) is gone. A path
// under /proc is checked every second; anything else is watched with
// inotify on its directory, so deletion is noticed at once. The watch ends
// with ctx.
func WatchRemoval(ctx context.Context, path string) (<-chan struct{}, error) {
	gone := make(chan struct{})
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", path, err)
	}
	if abs == "/proc" || strings.HasPrefix(abs, "/proc/") {
		go func() {
			t := time.NewTicker(procPollInterval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				if _, err := os.Lstat(abs); errors.Is(err, os.ErrNotExist) {
					close(gone)
					return
				}
			}
		}()
		return gone, nil
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", path, err)
	}
	dir, name := filepath.Dir(abs), filepath.Base(abs)
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_DELETE|unix.IN_MOVED_FROM|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	f := os.NewFile(uintptr(fd), "inotify")
	// Deleted between the caller's check and our watch: nothing would
	// tell us any more.
	if _, err := os.Lstat(abs); errors.Is(err, os.ErrNotExist) {
		f.Close()
		close(gone)
		return gone, nil
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	go func() {
		defer stop()
		defer f.Close()
		buf := make([]byte, 4096)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return // closed by ctx
			}
			if inotifyNames(buf[:n], name) {
				close(gone)
				return
			}
		}
	}()
	return gone, nil
}

// inotifyNames reports whether the events in buf remove name, or the
// watched directory itself.
func inotifyNames(buf []byte, name string) bool {
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		end := off + unix.SizeofInotifyEvent + int(ev.Len)
		if end > len(buf) {
			return false
		}
		if ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 {
			return true
		}
		raw := buf[off+unix.SizeofInotifyEvent : end]
		if i := bytes.IndexByte(raw, 0); i >= 0 {
			raw = raw[:i]
		}
		if string(raw) == name {
			return true
		}
		off = end
	}
	return false
}
