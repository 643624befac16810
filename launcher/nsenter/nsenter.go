// Package nsenter joins a user and a network namespace, or enters a
// sandbox, before the Go runtime starts, in the style of runc's nsenter.
//
// setns(CLONE_NEWUSER) fails with EINVAL in a multi-threaded process, and a
// Go program is multi-threaded before main runs; so the join happens in a C
// constructor, gated by environment variables that a parent sets when it
// re-executes its own binary. Importing this package links the constructor
// in; it does nothing unless those variables are set.
package nsenter

/*
extern int nsenter_errno;
extern const char *nsenter_step;
extern int nsenter_userns_errno;
extern int sandbox_errno;
extern const char *sandbox_step;
*/
import "C"

import (
	"fmt"
	"syscall"
)

// Environment variables read by the constructor.
const (
	EnvNetNS  = "_NETNS_RUN_NSENTER_NET"
	EnvUserNS = "_NETNS_RUN_NSENTER_USER"
	EnvMntNS  = "_NETNS_RUN_NSENTER_MNT"
	EnvUTSNS  = "_NETNS_RUN_NSENTER_UTS"
	// EnvPIDNS: the constructor forks after joining it (setns never
	// moves the caller itself); the child goes on, the parent relays
	// signals and the child's exit status.
	EnvPIDNS = "_NETNS_RUN_NSENTER_PID"
)

// Err reports whether joining the network namespace failed.
func Err() error {
	if C.nsenter_errno == 0 {
		return nil
	}
	return fmt.Errorf("%s: %w", C.GoString(C.nsenter_step), syscall.Errno(C.nsenter_errno))
}

// UserNSErr reports a failure to join the user namespace, which callers may
// ignore (slirp4netns does).
func UserNSErr() error {
	if C.nsenter_userns_errno == 0 {
		return nil
	}
	return fmt.Errorf("join user namespace: %w", syscall.Errno(C.nsenter_userns_errno))
}

// Environment variables that make the constructor enter a sandbox:
// EnvSandbox "1" for usernet's (first joining the user namespace open as
// descriptor EnvSandboxUserNSFD, which it closes), or SandboxEngine for
// netns-run's engine, which keeps EnvSandboxFiles descriptors from 3 on.
const (
	EnvSandbox         = "_NETNS_RUN_SANDBOX"
	EnvSandboxUserNSFD = "_NETNS_RUN_SANDBOX_USERNS_FD"
	SandboxEngine      = "engine"
	EnvSandboxFiles    = "_NETNS_RUN_SANDBOX_FILES"
)

// SandboxErr reports whether entering the sandbox failed.
func SandboxErr() error {
	if C.sandbox_errno == 0 {
		return nil
	}
	return fmt.Errorf("sandbox: %s: %w", C.GoString(C.sandbox_step), syscall.Errno(C.sandbox_errno))
}
