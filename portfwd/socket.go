package portfwd

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/netns-run/netns-run/portfwd/sockfile"
)

// APISocket is the listening API socket. Close removes the socket file,
// unless Handoff gave that job away, and only if the path still names the
// socket this process created.
type APISocket struct {
	Listener *net.UnixListener
	file     *sockfile.Owned
	remove   func() error
}

// ListenAPISocket makes a Unix socket at path that only its owner may use.
// It replaces a stale socket (nobody listening) like slirp4netns, and
// refuses anything else at path: a file, a link, another instance's socket.
func ListenAPISocket(path string) (*APISocket, error) {
	ln, file, err := sockfile.Listen(path)
	if err != nil {
		return nil, fmt.Errorf("api %w", err)
	}
	return &APISocket{Listener: ln, file: file, remove: file.Remove}, nil
}

// Handoff returns the listening socket as a file to carry across exec and
// the socket file's identity, for another process to remove it later (see
// AdoptAPISocket). This APISocket no longer removes the file.
func (s *APISocket) Handoff() (*os.File, *sockfile.Owned, error) {
	f, err := s.Listener.File()
	if err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	file := s.file
	s.file, s.remove = nil, func() error { return nil }
	return f, file, nil
}

// AdoptAPISocket rebuilds an APISocket from a listener inherited across
// exec (see Handoff); Close calls remove to have the socket file removed.
func AdoptAPISocket(listener *os.File, remove func() error) (*APISocket, error) {
	l, err := net.FileListener(listener)
	listener.Close()
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("api socket: inherited a %T, not a Unix socket", l)
	}
	return &APISocket{Listener: ul, remove: remove}, nil
}

// Close stops listening and removes the socket file if it is still ours.
func (s *APISocket) Close() error {
	err := s.Listener.Close()
	if errors.Is(err, net.ErrClosed) {
		err = nil // Serve closed it already
	}
	return errors.Join(err, s.remove())
}
