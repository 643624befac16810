package launcher

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// maxCopyUp bounds the file data copied into one copy-up tmpfs.
const maxCopyUp = 64 << 20

// copyUpEntry is one entry of a directory being copied up, captured before
// the tmpfs hides the original.
type copyUpEntry struct {
	name string
	mode fs.FileMode
	data []byte   // regular files we could read
	link string   // symlinks
	orig *os.File // directories and everything else: bind-mounted back
}

// copyUp makes dir writable inside the namespace without touching the
// host, like rootlesskit's --copy-up: a tmpfs goes over dir holding copies
// of its files and symlinks, while subdirectories and files we cannot read
// are bind-mounted from the original (reached through descriptors opened
// before the tmpfs hid it). Replacing an entry inside then only changes the
// namespace's view.
func copyUp(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("copy-up %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("copy-up %s: not a directory", dir)
	}
	entries, err := captureEntries(dir)
	defer func() {
		for _, e := range entries {
			if e.orig != nil {
				e.orig.Close()
			}
		}
	}()
	if err != nil {
		return err
	}
	// All the mode bits: /tmp's sticky bit keeps users from removing
	// each other's files, a setgid directory passes its group on.
	opts := fmt.Sprintf("mode=%o", st.Sys().(*syscall.Stat_t).Mode&0o7777)
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return fmt.Errorf("copy-up %s: mount tmpfs: %w", dir, err)
	}
	for _, e := range entries {
		if err := restoreEntry(dir, e); err != nil {
			return fmt.Errorf("copy-up %s: %w", filepath.Join(dir, e.name), err)
		}
	}
	return nil
}

func captureEntries(dir string) ([]copyUpEntry, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("copy-up %s: %w", dir, err)
	}
	var out []copyUpEntry
	total := 0
	for _, de := range des {
		path := filepath.Join(dir, de.Name())
		info, err := os.Lstat(path)
		if err != nil {
			continue // vanished
		}
		e := copyUpEntry{name: de.Name(), mode: info.Mode()}
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			if e.link, err = os.Readlink(path); err != nil {
				return out, fmt.Errorf("copy-up %s: %w", path, err)
			}
		case info.Mode().IsRegular() && total+int(info.Size()) <= maxCopyUp:
			if data, ok := readRegular(path, maxCopyUp-total); ok {
				e.data = data
				total += len(data)
				break
			}
			fallthrough
		default:
			f, err := os.OpenFile(path, unix.O_PATH|unix.O_NOFOLLOW, 0)
			if err != nil {
				return out, fmt.Errorf("copy-up %s: %w", path, err)
			}
			e.orig = f
		}
		out = append(out, e)
	}
	return out, nil
}

// readRegular reads the regular file at path if it holds at most limit
// bytes. The entry may have been replaced since it was listed (a shared
// directory: /tmp): a symlink is not followed, and a FIFO or device, or a
// file grown past the limit, is not read (no hang, no unbounded read); the
// caller binds the original instead.
func readRegular(path string, limit int) ([]byte, bool) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() > int64(limit) {
		return nil, false
	}
	data, err := io.ReadAll(io.LimitReader(f, int64(limit)+1))
	if err != nil || len(data) > limit {
		return nil, false
	}
	return data, true
}

func restoreEntry(dir string, e copyUpEntry) error {
	path := filepath.Join(dir, e.name)
	switch {
	case e.link != "":
		return os.Symlink(e.link, path)
	case e.orig == nil:
		if err := os.WriteFile(path, e.data, e.mode.Perm()); err != nil {
			return err
		}
		return os.Chmod(path, e.mode&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
	case e.mode.IsDir():
		if err := os.Mkdir(path, e.mode.Perm()); err != nil {
			return err
		}
	default:
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			return err
		}
	}
	src := fmt.Sprintf("/proc/self/fd/%d", e.orig.Fd())
	if err := unix.Mount(src, path, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind original: %w", err)
	}
	return nil
}
