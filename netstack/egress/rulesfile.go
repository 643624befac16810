package egress

import (
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Rules cross into a sandboxed process as a file in memory, in the policy
// file's format: ten thousand of them do not fit in the environment (the
// kernel takes at most 128 KiB per variable) nor in one control message.

// RulesFile returns an anonymous in-memory file holding rules, read from
// its start; the caller closes it.
func RulesFile(rules []Rule) (*os.File, error) {
	fd, err := unix.MemfdCreate("egress-rules", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("egress rules: memfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "egress-rules")
	var b strings.Builder
	for _, r := range rules {
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	if _, err := io.WriteString(f, b.String()); err != nil {
		f.Close()
		return nil, fmt.Errorf("egress rules: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("egress rules: %w", err)
	}
	return f, nil
}

// ReadRulesFile reads the rules RulesFile wrote and closes f.
func ReadRulesFile(f *os.File) ([]Rule, error) {
	defer f.Close()
	return ParsePolicy(f, "egress rules")
}
