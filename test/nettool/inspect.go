package main

import (
	"fmt"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// ptraceProbe tries what a debugger would do to process PID and prints
// "mem=R seize=R attach=R", each R "ok" or the error: opening
// /proc/PID/mem, PTRACE_SEIZE and, if that failed, PTRACE_ATTACH. A
// successful seize ends when this process exits; it stops nothing.
func ptraceProbe(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	pid, err := strconv.Atoi(args[0])
	if err != nil {
		return err
	}
	result := func(err error) string {
		if err == nil {
			return "ok"
		}
		return fmt.Sprintf("%q", err.Error())
	}
	fd, merr := unix.Open(fmt.Sprintf("/proc/%d/mem", pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if merr == nil {
		unix.Close(fd)
	}
	// The tracer is a thread, so every ptrace call comes from this one.
	runtime.LockOSThread()
	_, _, errno := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SEIZE, uintptr(pid), 0, 0, 0, 0)
	seize, attach := result(errnoErr(errno)), "not tried"
	if errno != 0 {
		attach = result(unix.PtraceAttach(pid))
	}
	fmt.Printf("mem=%s seize=%s attach=%s\n", result(merr), seize, attach)
	return nil
}

func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}
