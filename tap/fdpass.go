package tap

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// maxPassedFiles bounds how many descriptors one message may carry: a TAP's
// queues (a handful), or a batch of the port helper's sockets; anything
// beyond this is a protocol error.
const maxPassedFiles = 64

// SendFiles writes payload together with files as SCM_RIGHTS ancillary data
// in a single message on conn. The caller keeps ownership of files.
func SendFiles(conn *net.UnixConn, payload []byte, files ...*os.File) error {
	if len(files) > maxPassedFiles {
		return fmt.Errorf("send fds: %d files exceed the limit of %d", len(files), maxPassedFiles)
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := conn.WriteMsgUnix(payload, oob, nil)
	if err != nil {
		return fmt.Errorf("send fds: %w", err)
	}
	if n != len(payload) || oobn != len(oob) {
		return fmt.Errorf("send fds: short write (%d/%d bytes, %d/%d control bytes)", n, len(payload), oobn, len(oob))
	}
	return nil
}

// RecvFiles reads one message into buf and returns the payload length and any
// descriptors that came with it as files owned by the caller. Descriptors
// arrive close-on-exec.
func RecvFiles(conn *net.UnixConn, buf []byte) (int, []*os.File, error) {
	oob := make([]byte, unix.CmsgSpace(maxPassedFiles*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return 0, nil, fmt.Errorf("receive fds: %w", err)
	}
	files, perr := parseRights(oob[:oobn])
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeFiles(files)
		return 0, nil, errors.New("receive fds: message or control data truncated")
	}
	if perr != nil {
		// What was parsed before the error came with the message too.
		closeFiles(files)
		return 0, nil, perr
	}
	return n, files, nil
}

// RecvJSON reads one message of at most max bytes, decodes it into v and
// returns the descriptors that came with it (closed if it cannot be
// decoded). A peer that hung up gives io.EOF.
func RecvJSON(conn *net.UnixConn, max int, v any) ([]*os.File, error) {
	buf := make([]byte, max)
	n, files, err := RecvFiles(conn, buf)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		closeFiles(files)
		return nil, io.EOF
	}
	if err := json.Unmarshal(buf[:n], v); err != nil {
		closeFiles(files)
		return nil, fmt.Errorf("decode message: %w", err)
	}
	return files, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

func parseRights(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("receive fds: parse control message: %w", err)
	}
	var files []*os.File
	var firstErr error
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			if firstErr == nil {
				firstErr = fmt.Errorf("receive fds: %w", err)
			}
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "passed-fd"))
		}
	}
	return files, firstErr
}

// UnixConn turns a Unix socket descriptor (inherited, passed, or one end
// of a socketpair) into a connection; it closes f, the connection has its
// own descriptor.
func UnixConn(f *os.File) (*net.UnixConn, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("descriptor %q is a %T, not a Unix socket", f.Name(), c)
	}
	return uc, nil
}
