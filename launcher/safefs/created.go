package safefs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// Created is a file this process made at a path others may reach. Remove
// takes away that file and nothing else: not a file someone put there
// before (creating fails then), nor one that replaced ours since.
type Created struct {
	path     string
	dev, ino uint64
	kind     uint32 // S_IFMT bits
	// target of a symlink: a file made in the freed inode after ours was
	// removed may get its number, so for links the content counts too.
	target string
}

// Symlink creates a symlink at path pointing to target. An existing file
// at path is an error, left as it is.
func Symlink(target, path string) (*Created, error) {
	if err := os.Symlink(target, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("%s already exists; remove it or choose another path", path)
		}
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return nil, &fs.PathError{Op: "lstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		// Replaced in the moment since creating it: not ours to remove.
		return nil, fmt.Errorf("%s was replaced while being created", path)
	}
	return &Created{path: path, dev: st.Dev, ino: st.Ino, kind: unix.S_IFLNK, target: target}, nil
}

// Track records f, which this process created at path, for Remove.
func Track(f *os.File, path string) (*Created, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	return &Created{path: path, dev: st.Dev, ino: st.Ino, kind: st.Mode & unix.S_IFMT}, nil
}

// Remove unlinks the path if it still names the file that was created
// there (same device, inode and type); otherwise it leaves it alone.
func (c *Created) Remove() error {
	if c == nil {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Lstat(c.path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return &fs.PathError{Op: "lstat", Path: c.path, Err: err}
	}
	same := st.Dev == c.dev && st.Ino == c.ino && st.Mode&unix.S_IFMT == c.kind
	if same && c.kind == unix.S_IFLNK {
		target, err := os.Readlink(c.path)
		same = err == nil && target == c.target
	}
	if !same {
		return fmt.Errorf("%s: no longer the file this process created; left in place", c.path)
	}
	if err := unix.Unlink(c.path); err != nil && !errors.Is(err, unix.ENOENT) {
		return &fs.PathError{Op: "remove", Path: c.path, Err: err}
	}
	return nil
}
