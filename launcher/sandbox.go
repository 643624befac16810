package launcher

import (
	"encoding/json"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher/nsenter"
)

// sandboxStateEnv carries the state of the process across the re-exec
// into the sandbox.
const sandboxStateEnv = "_NETNS_RUN_SANDBOX_STATE"

// ReexecSandboxed replaces the running program, keeping its PID (which
// runtimes track), with a fresh copy that enters a sandbox before its Go
// runtime starts: a private mount namespace whose root holds only /etc and
// /run read-only, no capabilities but CAP_NET_BIND_SERVICE, no_new_privs.
// An unprivileged caller first joins userns (the container's user namespace,
// open; nil for none) to be allowed to do that.
//
// Nothing the copy needs is looked up by path after the exec: the host's
// paths (namespace files, the API socket's directory, the capture file) may
// not exist in the sandbox, so the caller opens them first and passes them
// in keep or state.
//
// state is marshalled to JSON for SandboxedState; keep lists the files that
// must stay open (their descriptor numbers do not change). It only returns on
// failure.
func ReexecSandboxed(userns *os.File, state any, keep ...*os.File) error {
	b, err := json.Marshal(state)
	if err != nil {
		return fmt.Errorf("sandbox: encode state: %w", err)
	}
	env := append(os.Environ(), sandboxStateEnv+"="+string(b), nsenter.EnvSandbox+"=1")
	if userns != nil {
		// The constructor joins it and closes it.
		keep = append(keep, userns)
		env = append(env, fmt.Sprintf("%s=%d", nsenter.EnvSandboxUserNSFD, userns.Fd()))
	}
	for _, f := range keep {
		// Clearing close-on-exec is what carries the file across.
		if _, err := unix.FcntlInt(f.Fd(), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("sandbox: keep %s open: %w", f.Name(), err)
		}
	}
	err = syscall.Exec("/proc/self/exe", os.Args, env)
	return fmt.Errorf("sandbox: re-exec: %w", err)
}

// IsSandboxedCopy reports whether this process was started by
// ReexecSandboxed (before SandboxedState consumes the marker).
func IsSandboxedCopy() bool {
	_, ok := os.LookupEnv(sandboxStateEnv)
	return ok
}

// SandboxedState reports whether this process is the sandboxed copy made by
// ReexecSandboxed and, if so, decodes the state it was given into v.
func SandboxedState(v any) (bool, error) {
	s, ok := os.LookupEnv(sandboxStateEnv)
	if !ok {
		return false, nil
	}
	return true, sandboxState(s, v, sandboxStateEnv, nsenter.EnvSandbox, nsenter.EnvSandboxUserNSFD)
}

// sandboxState, in a process that entered a sandbox, clears the variables
// that got it there (env) and decodes its state into v, unless entering
// the sandbox failed.
func sandboxState(state string, v any, env ...string) error {
	for _, k := range env {
		os.Unsetenv(k)
	}
	if err := nsenter.SandboxErr(); err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(state), v); err != nil {
		return fmt.Errorf("sandbox: decode state: %w", err)
	}
	return nil
}
