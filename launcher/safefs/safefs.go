// Package safefs creates, reads and removes the files netns-run and usernet
// write on the user's behalf (state directory, packet capture, the --netns
// link) without trusting whatever another user may have put at those paths:
// no symlink is followed at the last component, no file of someone else's
// is truncated, and only files this process created are removed.
package safefs

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// ErrNotPrivate is wrapped by OpenDir's refusals (foreign owner, writable
// by others); the message names the fix.
var ErrNotPrivate = errors.New("not a private directory")

// maxRead bounds ReadFile: state files hold a number or a path.
const maxRead = 4096

// Dir is an open directory that only the caller may change. Files are made
// and removed relative to the open descriptor, so renaming a path component
// above it cannot redirect them.
type Dir struct {
	f    *os.File
	path string
}

// OpenDir opens path as a private directory. With create, a missing
// directory is made with mode 0700 (parents too). It is refused unless it
// belongs to the caller and neither group nor others may write it; a
// symlink at path is followed only if the caller owns it.
func OpenDir(path string, create bool) (*Dir, error) {
	if create {
		if err := os.MkdirAll(path, 0o700); err != nil {
			return nil, err
		}
	}
	var lst unix.Stat_t
	if err := unix.Lstat(path, &lst); err == nil && lst.Mode&unix.S_IFMT == unix.S_IFLNK && int(lst.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("%s: %w: a symlink owned by uid %d, not by you (uid %d); give the directory itself",
			path, ErrNotPrivate, lst.Uid, os.Geteuid())
	}
	f, st, err := openStat(path, func() (int, error) {
		return unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	})
	if err != nil {
		return nil, err
	}
	if int(st.Uid) != os.Geteuid() {
		f.Close()
		return nil, fmt.Errorf("%s: %w: owned by uid %d, not by you (uid %d); use a directory of your own, e.g. under ~/.cache",
			path, ErrNotPrivate, st.Uid, os.Geteuid())
	}
	if st.Mode&0o022 != 0 {
		f.Close()
		return nil, fmt.Errorf("%s: %w: group or others may write it (mode %04o); run `chmod go-w %s` or use another directory",
			path, ErrNotPrivate, st.Mode&0o7777, path)
	}
	return &Dir{f: f, path: path}, nil
}

// Path is the path the directory was opened by.
func (d *Dir) Path() string { return d.path }

// Close releases the directory.
func (d *Dir) Close() error { return d.f.Close() }

func (d *Dir) fd() int { return int(d.f.Fd()) }

// ErrLocked: another process holds the directory's lock.
var ErrLocked = errors.New("locked by another process")

// TryLock takes the directory's exclusive lock (flock), held until Close,
// or says ErrLocked at once.
func (d *Dir) TryLock() error {
	err := unix.Flock(d.fd(), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("%s: %w", d.path, ErrLocked)
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", d.path, err)
	}
	return nil
}

// Unlock releases the lock TryLock took.
func (d *Dir) Unlock() { _ = unix.Flock(d.fd(), unix.LOCK_UN) }

// Create makes a new, empty file name in d (mode 0600) for writing,
// replacing what was there: an old file is unlinked, not truncated, and the
// new one is created exclusively without following a symlink.
func (d *Dir) Create(name string) (*os.File, error) {
	if err := d.Remove(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd(), name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, &fs.PathError{Op: "create", Path: d.join(name), Err: err}
	}
	return os.NewFile(uintptr(fd), d.join(name)), nil
}

// WriteFile replaces name in d with a new file holding data.
func (d *Dir) WriteFile(name string, data []byte) error {
	f, err := d.Create(name)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// ReadFile returns the start (up to 4 KiB) of the regular file name in d.
func (d *Dir) ReadFile(name string) ([]byte, error) {
	f, st, err := openStat(d.join(name), func() (int, error) {
		return unix.Openat(d.fd(), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	})
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s: not a regular file", d.join(name))
	}
	return io.ReadAll(io.LimitReader(f, maxRead))
}

// Remove unlinks name from d; a name that is not there is not an error.
func (d *Dir) Remove(name string) error {
	err := unix.Unlinkat(d.fd(), name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return &fs.PathError{Op: "remove", Path: d.join(name), Err: err}
}

func (d *Dir) join(name string) string { return d.path + "/" + name }

// CreateFile opens path for writing from its start, for output the caller
// asked for by name (a packet capture): it creates the file (mode 0600) or
// truncates an existing one only if that is a regular file of the caller's
// with no other hard link. A symlink at path is refused, not followed.
func CreateFile(path string) (*os.File, error) {
	// O_NONBLOCK: a FIFO put there must not block the open; it is refused
	// below like any other non-regular file.
	f, st, err := openStat(path, func() (int, error) {
		return unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	})
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("%s: is a symlink; give the file itself", path)
	}
	if err != nil {
		return nil, err
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		err = fmt.Errorf("%s: not a regular file", path)
	case int(st.Uid) != os.Geteuid():
		err = fmt.Errorf("%s: belongs to uid %d, not to you (uid %d); refusing to overwrite it", path, st.Uid, os.Geteuid())
	case st.Nlink > 1:
		err = fmt.Errorf("%s: has %d hard links; refusing to overwrite it", path, st.Nlink)
	default:
		err = f.Truncate(0)
	}
	if err == nil {
		_, err = unix.FcntlInt(f.Fd(), unix.F_SETFL, 0) // back to blocking writes
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// openStat opens a file with open and reads its status from the open
// descriptor (what was opened, not what the path names by now).
func openStat(path string, open func() (int, error)) (*os.File, *unix.Stat_t, error) {
	fd, err := open()
	if err != nil {
		return nil, nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	return f, &st, nil
}
