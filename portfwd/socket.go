package portfwd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// APISocket is the listening API socket and a handle on its directory, so
// the socket file can be removed even after the process has pivoted into a
// sandbox where the path no longer resolves.
type APISocket struct {
	Listener *net.UnixListener
	dir      *os.File
	name     string
}

// ListenAPISocket replaces any file at path with a Unix socket only its
// owner may use.
func ListenAPISocket(path string) (*APISocket, error) {
	if len(path) >= 108 {
		return nil, fmt.Errorf("api socket path %q: longer than the 107 bytes a Unix socket path may have", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("api socket %q: %w", path, err)
	}
	dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, fmt.Errorf("api socket %q: %w", path, err)
	}
	// Owner-only from the start: no window where others may connect.
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		dir.Close()
		return nil, fmt.Errorf("api socket %q: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	return &APISocket{Listener: ln, dir: dir, name: filepath.Base(path)}, nil
}

// AdoptAPISocket rebuilds an APISocket from descriptors inherited across
// exec (see Files).
func AdoptAPISocket(listener, dir *os.File, name string) (*APISocket, error) {
	l, err := net.FileListener(listener)
	listener.Close()
	if err != nil {
		dir.Close()
		return nil, fmt.Errorf("api socket: %w", err)
	}
	return &APISocket{Listener: l.(*net.UnixListener), dir: dir, name: name}, nil
}

// Files returns the descriptors to carry across exec, and the name to give
// AdoptAPISocket.
func (s *APISocket) Files() (listener, dir *os.File, name string, err error) {
	f, err := s.Listener.File()
	if err != nil {
		return nil, nil, "", fmt.Errorf("api socket: %w", err)
	}
	return f, s.dir, s.name, nil
}

// Close stops listening and removes the socket file.
func (s *APISocket) Close() error {
	err := s.Listener.Close()
	if errors.Is(err, net.ErrClosed) {
		err = nil // Serve closed it already
	}
	if rerr := unix.Unlinkat(int(s.dir.Fd()), s.name, 0); rerr != nil && !errors.Is(rerr, unix.ENOENT) && err == nil {
		err = rerr
	}
	s.dir.Close()
	return err
}
