package launcher

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// readRegular reads a small regular file, and nothing else: not a FIFO
// (which would hang), not through a symlink (to /dev/zero, say, which
// would never end), not a file over the limit.
func TestReadRegular(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	if data, ok := readRegular(file, 64); !ok || string(data) != "hello" {
		t.Errorf("regular file: %q, %v", data, ok)
	}
	if _, ok := readRegular(file, 4); ok {
		t.Error("a file over the limit was read")
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, ok := readRegular(fifo, 64); ok {
		t.Error("a FIFO was read")
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink("/dev/zero", link); err != nil {
		t.Fatal(err)
	}
	if _, ok := readRegular(link, 64); ok {
		t.Error("a symlink was followed")
	}
}
