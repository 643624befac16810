// Package sockfile creates a Unix socket at a path and later removes that
// file only if it is still the socket it created: the path may meanwhile
// name another program's socket or a file someone put there.
package sockfile

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// Owned identifies a socket file this process created: a handle on its
// directory (O_PATH; it does not allow reading the directory), its name
// there, and its device and inode numbers.
type Owned struct {
	Dir      *os.File
	Name     string
	Dev, Ino uint64
}

// Listen makes a Unix socket at path that only its owner may use. A socket
// already there is replaced only when nobody accepts connections on it (a
// stale socket, as left by a killed program); anything else at path is an
// error.
func Listen(path string) (*net.UnixListener, *Owned, error) {
	if len(path) >= 108 {
		return nil, nil, fmt.Errorf("socket path %q: longer than the 107 bytes a Unix socket path may have", path)
	}
	if err := removeStale(path); err != nil {
		return nil, nil, err
	}
	dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socket %q: %w", path, err)
	}
	// Owner-only from the start: no window where others may connect.
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		dir.Close()
		return nil, nil, fmt.Errorf("socket %q: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	o := &Owned{Dir: dir, Name: filepath.Base(path)}
	var st unix.Stat_t
	if err := unix.Fstatat(int(dir.Fd()), o.Name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		ln.Close()
		dir.Close()
		return nil, nil, fmt.Errorf("socket %q: %w", path, err)
	}
	o.Dev, o.Ino = st.Dev, st.Ino
	return ln, o, nil
}

// removeStale clears path for a new socket: nothing there, or a socket
// nobody listens on.
func removeStale(path string) error {
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %q: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("socket %q: the path exists and is not a socket; not replacing it", path)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %q: in use by a running program (another instance?); not replacing it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %q: exists and cannot be checked; not replacing it: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("socket %q: remove stale socket: %w", path, err)
	}
	return nil
}

// Remove unlinks the socket if the name still refers to it, and closes the
// directory handle. Something else at the name is left alone.
func (o *Owned) Remove() error {
	defer o.Dir.Close()
	var st unix.Stat_t
	err := unix.Fstatat(int(o.Dir.Fd()), o.Name, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove socket %s: %w", o.Name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Dev != o.Dev || st.Ino != o.Ino {
		return nil
	}
	if err := unix.Unlinkat(int(o.Dir.Fd()), o.Name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove socket %s: %w", o.Name, err)
	}
	return nil
}
