package launcher

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// cloneNewFlags are clone's namespace flags (CLONE_NEWTIME, NEWNS,
// NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
const cloneNewFlags = 0x7e020080

// loadCloneFilter refuses new namespaces to every thread: clone with a
// CLONE_NEW* flag fails with EPERM, and clone3, whose flags sit in memory
// a filter cannot read, with ENOSYS, so that glibc's pthread_create (the
// relay loop's C thread) falls back to clone. A process in namespaces of
// its own is root there, and reaches what its owner cannot (nf_tables'
// netlink, the usual way in to a kernel bug). The filter library answers
// only EPERM, which pthread_create does not fall back from; hence this one,
// written out. The kernel applies every filter loaded, the strictest answer
// winning. Architectures other than amd64 and arm64 go without it.
func loadCloneFilter() error {
	var auditArch uint32
	switch runtime.GOARCH {
	case "amd64":
		auditArch = unix.AUDIT_ARCH_X86_64
	case "arm64":
		auditArch = unix.AUDIT_ARCH_AARCH64
	default:
		return nil
	}
	const (
		ld   = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jset = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
		ret  = unix.BPF_RET | unix.BPF_K
		// struct seccomp_data: nr, arch, instruction pointer, then
		// args; the low half of args[0] on these little-endian ones.
		offNr, offArch, offArg0 = 0, 4, 16
	)
	prog := []unix.SockFilter{
		/* 0 */ {Code: ld, K: offArch},
		/* 1 */ {Code: jeq, K: auditArch, Jt: 0, Jf: 5}, // else 7: allow
		/* 2 */ {Code: ld, K: offNr},
		/* 3 */ {Code: jeq, K: unix.SYS_CLONE3, Jt: 4, Jf: 0}, // 8: ENOSYS
		/* 4 */ {Code: jeq, K: unix.SYS_CLONE, Jt: 0, Jf: 2}, // else 7: allow
		/* 5 */ {Code: ld, K: offArg0},
		/* 6 */ {Code: jset, K: cloneNewFlags, Jt: 2, Jf: 0}, // 9: EPERM
		/* 7 */ {Code: ret, K: unix.SECCOMP_RET_ALLOW},
		/* 8 */ {Code: ret, K: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
		/* 9 */ {Code: ret, K: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("seccomp: no_new_privs: %w", err)
	}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(prog)
	switch {
	case errno != 0:
		return fmt.Errorf("seccomp: clone filter: %w", errno)
	case r != 0:
		return fmt.Errorf("seccomp: clone filter: thread %d could not take it", r)
	}
	return nil
}
