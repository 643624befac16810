package launcher

import (
	"fmt"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/sys/unix"
)

// steadyStateSyscalls is everything a running helper (usernet after its
// setup) needs: the Go runtime (memory, threads, signals, timers, the
// netpoller), sockets of every kind the forwarders and the API use
// (including ICMP ping sockets, netlink route lookups and error queues),
// removing its API socket, and watching the target process. It was taken
// from strace of a helper serving TCP, UDP, DNS, ICMP, IPv6, published
// ports and API calls, minus what only setup uses (mount, pivot_root,
// setns, unshare, capset, execve, prctl, ...), which the filter refuses.
var steadyStateSyscalls = []string{
	// Go runtime.
	"brk", "mmap", "munmap", "mprotect", "madvise", "mincore",
	"futex", "nanosleep", "clock_gettime", "clock_nanosleep", "gettimeofday", "sched_yield", "sched_getaffinity",
	"clone", "clone3", "set_robust_list", "rseq", "set_tid_address", "gettid", "getpid", "tgkill", "tkill",
	"exit", "exit_group", "restart_syscall",
	"rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
	"getrandom", "prlimit64", "uname", "arch_prctl",
	// Our own ids: the message saying why ping is unavailable names the
	// group (without them it said "gid -1").
	"getuid", "geteuid", "getgid", "getegid",
	// Files and the netpoller.
	"read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "fcntl", "dup", "dup3",
	// (fstatat is arm64's name for newfstatat.)
	"openat", "newfstatat", "fstatat", "fstat", "getdents64", "unlinkat",
	"epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_wait", "ppoll", "poll", "pipe2", "eventfd2",
	// Sockets (socket itself only of the families in socketRules).
	"connect", "bind", "listen", "accept4", "getsockname", "getpeername",
	// The kernel TCP path moves bytes between two sockets through a pipe.
	"splice",
	"getsockopt", "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
	// The target process.
	"pidfd_open",
}

// steadyStateIoctls are the only ioctl requests allowed: those that the
// API's caller check (portfwd's checkPeer) uses to find a caller's user
// namespace and its parents, and the TCP relay's question how much a host
// socket holds. Any other (TIOCSTI on an inherited terminal, say) fails.
var steadyStateIoctls = []uint64{
	0xff09,             // PIDFD_GET_USER_NAMESPACE
	unix.NS_GET_PARENT, // walk up user namespaces
	unix.SIOCINQ,       // bytes queued on a socket (FIONREAD)
}

// syscallsOf is steadyStateSyscalls less the names info's architecture
// lacks (arch_prctl, poll and epoll_wait are amd64's): the filter library
// refuses a name it does not know, and the filter would not load.
func syscallsOf(info *arch.Info) []string {
	var names []string
	for _, n := range steadyStateSyscalls {
		if _, ok := info.SyscallNames[n]; ok {
			names = append(names, n)
		}
	}
	return names
}

// LoadSeccomp confines the calling process (all threads) to the helper's
// steady-state system calls; anything else fails with EPERM instead of
// killing the helper. New namespaces are refused too (loadCloneFilter). With logDenied the kernel also logs each refused call
// (SECCOMP_FILTER_FLAG_LOG: see dmesg or the audit log). It sets
// no_new_privs.
func LoadSeccomp(logDenied bool) error {
	info, err := arch.GetInfo("")
	if err != nil {
		return fmt.Errorf("seccomp: %w", err)
	}
	// First: the allow-list refuses seccomp itself.
	if err := loadCloneFilter(); err != nil {
		return err
	}
	flag := seccomp.FilterFlagTSync
	if logDenied {
		flag |= seccomp.FilterFlagLog
	}
	filter := seccomp.Filter{
		NoNewPrivs: true,
		Flag:       flag,
		Policy: seccomp.Policy{
			DefaultAction: seccomp.ActionErrno,
			Syscalls:      []seccomp.SyscallGroup{{Action: seccomp.ActionAllow, Names: syscallsOf(info), NamesWithCondtions: append(socketRules(), ioctlRules()...)}},
		},
	}
	if err := seccomp.LoadFilter(filter); err != nil {
		return fmt.Errorf("seccomp: %w", err)
	}
	return nil
}

// socketRules allow new sockets of the Internet families and route
// netlink only. The helper's Unix sockets (the API's, the engine's
// channels) are made before the filter: a new one could reach the user's
// abstract sockets (an X server, a session bus), which belong to the
// network namespace the engine shares with the host; other netlink
// families (netfilter) are the usual way in to a kernel bug.
func socketRules() []seccomp.NameWithConditions {
	arg := func(n int, v uint64) seccomp.Condition {
		return seccomp.Condition{Argument: uint32(n), Operation: seccomp.Equal, Value: v}
	}
	return []seccomp.NameWithConditions{
		{Name: "socket", Conditions: seccomp.ArgumentConditions{arg(0, unix.AF_INET)}},
		{Name: "socket", Conditions: seccomp.ArgumentConditions{arg(0, unix.AF_INET6)}},
		{Name: "socket", Conditions: seccomp.ArgumentConditions{arg(0, unix.AF_NETLINK), arg(2, unix.NETLINK_ROUTE)}},
	}
}

func ioctlRules() []seccomp.NameWithConditions {
	var rules []seccomp.NameWithConditions
	for _, req := range steadyStateIoctls {
		rules = append(rules, seccomp.NameWithConditions{Name: "ioctl",
			Conditions: seccomp.ArgumentConditions{{Argument: 1, Operation: seccomp.Equal, Value: req}}})
	}
	return rules
}
