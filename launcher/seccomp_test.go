package launcher

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"syscall"
	"testing"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/sys/unix"
)

// TestSeccompFilter loads the filter in a child copy of the test binary
// (it cannot be undone) and checks there that networking still works and
// that execve and ptrace fail with EPERM.
func TestSeccompFilter(t *testing.T) {
	if os.Getenv("SECCOMP_TEST_CHILD") == "1" {
		seccompChild(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSeccompFilter$", "-test.v")
	cmd.Env = append(os.Environ(), "SECCOMP_TEST_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func seccompChild(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := LoadSeccomp(false); err != nil {
		t.Fatal(err)
	}
	// A round trip over loopback after the filter is in place.
	go func() {
		if c, err := ln.Accept(); err == nil {
			_, _ = c.Write([]byte("ok"))
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial under seccomp: %v", err)
	}
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil || string(buf) != "ok" {
		t.Fatalf("read under seccomp: %q %v", buf, err)
	}
	c.Close()
	// No new namespaces: clone with a CLONE_NEW* flag is refused before
	// the kernel looks at it (without the filter, CLONE_NEWUSER with
	// CLONE_THREAD is EINVAL, and no child is ever made), and clone3 says
	// ENOSYS (without the filter, a NULL argument is EFAULT).
	if _, _, errno := unix.RawSyscall(unix.SYS_CLONE, unix.CLONE_NEWUSER|unix.CLONE_THREAD|unix.CLONE_SIGHAND|unix.CLONE_VM, 0, 0); errno != unix.EPERM {
		t.Errorf("clone(CLONE_NEWUSER): %v, want EPERM", errno)
	}
	if _, _, errno := unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0); errno != unix.ENOSYS {
		t.Errorf("clone3: %v, want ENOSYS", errno)
	}
	// Threads are still made.
	started := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		close(started)
	}()
	<-started
	// New sockets of the Internet families and route netlink only.
	for _, c := range []struct {
		name               string
		domain, typ, proto int
		want               error
	}{
		{"udp", unix.AF_INET6, unix.SOCK_DGRAM, 0, nil},
		{"route netlink", unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE, nil},
		{"unix", unix.AF_UNIX, unix.SOCK_STREAM, 0, syscall.EPERM},
		{"netfilter netlink", unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_NETFILTER, syscall.EPERM},
	} {
		fd, err := unix.Socket(c.domain, c.typ|unix.SOCK_CLOEXEC, c.proto)
		if err == nil {
			unix.Close(fd)
		}
		if !errors.Is(err, c.want) && err != c.want {
			t.Errorf("socket %s: %v, want %v", c.name, err, c.want)
		}
	}
	if err := syscall.Exec("/bin/true", []string{"true"}, nil); !errors.Is(err, syscall.EPERM) {
		t.Errorf("execve: %v, want EPERM", err)
	}
	if _, _, errno := syscall.Syscall(syscall.SYS_PTRACE, syscall.PTRACE_TRACEME, 0, 0); errno != syscall.EPERM {
		t.Errorf("ptrace: %v, want EPERM", errno)
	}
	if err := syscall.Mount("none", "/mnt", "tmpfs", 0, ""); !errors.Is(err, syscall.EPERM) {
		t.Errorf("mount: %v, want EPERM", err)
	}
	// Only the ioctls of the API's caller check pass.
	if _, err := unix.IoctlGetInt(0, unix.TIOCGPGRP); !errors.Is(err, syscall.EPERM) {
		t.Errorf("ioctl TIOCGPGRP: %v, want EPERM", err)
	}
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.IoctlRetInt(pidfd, 0xff09); err != nil {
		t.Errorf("ioctl PIDFD_GET_USER_NAMESPACE: %v", err)
	}
}

// The allow-list builds for both architectures the binaries are made for:
// each keeps the calls it has, and every name is some architecture's (a
// typo would silently allow nothing).
func TestSeccompListPerArchitecture(t *testing.T) {
	known := map[string]bool{}
	for _, name := range []string{"amd64", "arm64"} {
		info, err := arch.GetInfo(name)
		if err != nil {
			t.Fatal(err)
		}
		names := syscallsOf(info)
		for _, n := range names {
			known[n] = true
		}
		for _, must := range []string{"read", "write", "futex", "epoll_pwait", "connect", "splice"} {
			if !slices.Contains(names, must) {
				t.Errorf("%s: %s not allowed", name, must)
			}
		}
		p := seccomp.Policy{DefaultAction: seccomp.ActionErrno,
			Syscalls: []seccomp.SyscallGroup{{Action: seccomp.ActionAllow, Names: names, NamesWithCondtions: append(socketRules(), ioctlRules()...)}}}
		if _, err := p.Assemble(); name == runtime.GOARCH && err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, n := range steadyStateSyscalls {
		if !known[n] {
			t.Errorf("%q is no architecture's system call", n)
		}
	}
	arm, _ := arch.GetInfo("arm64")
	if names := syscallsOf(arm); !slices.Contains(names, "fstatat") || slices.Contains(names, "arch_prctl") {
		t.Errorf("arm64: %v", names)
	}
}
