package safefs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// otherUID owns the files of "another user" in the tests that need root
// to make them.
const otherUID = 65534

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to make files owned by another user")
	}
}

func TestOpenDirCreatesPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a", "state")
	d, err := OpenDir(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("created state dir: %v, %v; want mode 0700", st.Mode(), err)
	}
}

func TestOpenDirRefusesShared(t *testing.T) {
	path := t.TempDir()
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	_, err := OpenDir(path, true)
	if !errors.Is(err, ErrNotPrivate) || !strings.Contains(err.Error(), "chmod go-w") {
		t.Fatalf("world-writable dir: %v; want a refusal naming chmod", err)
	}
	if err := os.Chmod(path, 0o770); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDir(path, false); !errors.Is(err, ErrNotPrivate) {
		t.Fatalf("group-writable dir: %v", err)
	}
}

func TestOpenDirRefusesForeign(t *testing.T) {
	requireRoot(t)
	path := t.TempDir()
	if err := os.Chown(path, otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDir(path, true); !errors.Is(err, ErrNotPrivate) || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Fatalf("dir of another user: %v", err)
	}
	// A symlink someone else planted, even to a directory of ours.
	own := t.TempDir()
	link := filepath.Join(path, "link")
	if err := os.Symlink(own, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenDir(link, false); !errors.Is(err, ErrNotPrivate) {
		t.Fatalf("foreign symlink to our dir: %v", err)
	}
}

func TestCreateDoesNotFollowOrTruncate(t *testing.T) {
	base := t.TempDir()
	victim := filepath.Join(base, "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := OpenDir(filepath.Join(base, "state"), true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// A planted symlink and a hard link to the victim.
	if err := os.Symlink(victim, filepath.Join(d.Path(), "log")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(victim, filepath.Join(d.Path(), "pid")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"log", "pid"} {
		if err := d.WriteFile(name, []byte("ours\n")); err != nil {
			t.Fatal(err)
		}
		if b, _ := d.ReadFile(name); string(b) != "ours\n" {
			t.Errorf("%s: %q", name, b)
		}
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Fatalf("victim changed through the state dir: %q", b)
	}
	if err := os.Symlink(victim, filepath.Join(d.Path(), "netns")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadFile("netns"); err == nil {
		t.Errorf("ReadFile followed a symlink")
	}
}

func TestCreateFile(t *testing.T) {
	base := t.TempDir()
	victim := filepath.Join(base, "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link.pcap")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	if _, err := CreateFile(link); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("symlink: %v", err)
	}
	hard := filepath.Join(base, "hard.pcap")
	if err := os.Link(victim, hard); err != nil {
		t.Fatal(err)
	}
	if _, err := CreateFile(hard); err == nil || !strings.Contains(err.Error(), "hard links") {
		t.Errorf("hard link: %v", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Fatalf("victim changed: %q", b)
	}
	own := filepath.Join(base, "own.pcap")
	if err := os.WriteFile(own, []byte("old capture"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := CreateFile(own)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if st, _ := os.Stat(own); st.Size() != 0 {
		t.Errorf("own file not truncated: %d bytes", st.Size())
	}
}

func TestCreateFileRefusesForeign(t *testing.T) {
	requireRoot(t)
	path := filepath.Join(t.TempDir(), "theirs.pcap")
	if err := os.WriteFile(path, []byte("theirs"), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	if _, err := CreateFile(path); err == nil || !strings.Contains(err.Error(), "uid 65534") {
		t.Fatalf("file of another user: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "theirs" {
		t.Fatalf("their file changed: %q", b)
	}
}

func TestCreatedRemovesOnlyItsOwn(t *testing.T) {
	base := t.TempDir()
	path := filepath.Join(base, "netns")
	if err := os.WriteFile(path, []byte("someone's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Symlink("/proc/self/ns/net", path); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("existing file: %v", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("existing file removed: %v", err)
	}
	os.Remove(path)
	c, err := Symlink("/proc/self/ns/net", path)
	if err != nil {
		t.Fatal(err)
	}
	// Replaced by another instance's link meanwhile: left alone.
	os.Remove(path)
	if err := os.Symlink("/proc/1/ns/net", path); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(); err == nil {
		t.Errorf("removed a link it did not create")
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("other link gone: %v", err)
	}
	os.Remove(path)
	if c, err = Symlink("/proc/self/ns/net", path); err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("own link left: %v", err)
	}
}
