package launcher

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/portfwd/sockfile"
	"github.com/netns-run/netns-run/tap"
)

// A sandboxed process must hold nothing that names the host's filesystem:
// a directory handle survives pivot_root and openat(dir, "../..") walks
// out of the sandbox. So the socket file a sandboxed helper created is
// removed by a small process that stays outside: it holds the directory
// handle, waits until the helper asks (or dies, which hangs up the
// connection), removes the file if it is still the helper's, and exits.

// removerEnvValue of childEnv marks the re-executed remover; removerFileEnv
// carries the file's name and identity (the directory is descriptor 4, the
// connection 3).
const (
	removerEnvValue = "remover"
	removerFileEnv  = "_NETNS_RUN_REMOVER_FILE"
)

// removeTimeout bounds how long a helper at exit waits for the remover.
const removeTimeout = 5 * time.Second

type removerFile struct {
	Name string `json:"name"`
	Dev  uint64 `json:"dev"`
	Ino  uint64 `json:"ino"`
}

// StartRemover starts the remover for file and returns this process's end
// of the connection to it: keep it open across the re-exec into the
// sandbox, and call AskRemove on it at exit. file's directory handle is
// closed here; only the remover holds one.
func StartRemover(file *sockfile.Owned) (*os.File, error) {
	defer file.Dir.Close()
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start remover: socketpair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(pair[0]), "remover"), os.NewFile(uintptr(pair[1]), "remover-peer")
	defer theirs.Close()
	desc, err := json.Marshal(removerFile{Name: file.Name, Dev: file.Dev, Ino: file.Ino})
	if err != nil {
		ours.Close()
		return nil, fmt.Errorf("start remover: %w", err)
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{os.Args[0]}
	cmd.Env = append(os.Environ(), childEnv+"="+removerEnvValue, removerFileEnv+"="+string(desc))
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = []*os.File{theirs, file.Dir}
	if err := cmd.Start(); err != nil {
		ours.Close()
		return nil, fmt.Errorf("start remover: %w", err)
	}
	// Not waited for: this image is about to be replaced by the sandboxed
	// one, which exits soon after the remover does.
	_ = cmd.Process.Release()
	return ours, nil
}

// AskRemove has the remover at the other end of conn remove its file, and
// waits until it has. It closes conn.
func AskRemove(conn *os.File) error {
	c, err := tap.UnixConn(conn)
	if err != nil {
		return fmt.Errorf("remove socket file: %w", err)
	}
	defer c.Close()
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("remove socket file: %w", err)
	}
	if err := c.SetReadDeadline(time.Now().Add(removeTimeout)); err != nil {
		return fmt.Errorf("remove socket file: %w", err)
	}
	// The remover closes its end once the file is gone.
	if _, err := io.Copy(io.Discard, c); err != nil {
		return fmt.Errorf("remove socket file: waiting for the remover: %w", err)
	}
	return nil
}

// runRemover is the remover process.
func runRemover() int {
	// It ends with the helper, not with a Ctrl-C meant for the helper's
	// process group: the helper exits on that and needs the remover then.
	signal.Ignore(unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT)
	dir := os.NewFile(4, "dir")
	conn, err := tap.UnixConn(os.NewFile(3, "remover"))
	var f removerFile
	if err == nil {
		err = json.Unmarshal([]byte(os.Getenv(removerFileEnv)), &f)
	}
	if err != nil {
		dir.Close()
		fmt.Fprintf(os.Stderr, "remover: %v\n", err)
		return 1
	}
	defer conn.Close()
	// Data or end of file: either way the helper is done with the socket.
	_, _ = io.Copy(io.Discard, conn)
	owned := &sockfile.Owned{Dir: dir, Name: f.Name, Dev: f.Dev, Ino: f.Ino}
	if err := owned.Remove(); err != nil {
		fmt.Fprintf(os.Stderr, "remover: %v\n", err)
		return 1
	}
	return 0
}
