package launcher

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher/nsenter"
)

// The packet engine parses every frame the guest sends, so it runs with
// nothing worth taking: our binary again, started by clone in fresh user,
// mount, PID and IPC namespaces (root there, to build the sandbox), where
// package nsenter's constructor (before
// the Go runtime starts) closes every descriptor but the ones handed over,
// pivots into an empty read-only tmpfs, drops every capability, sets
// no_new_privs and makes it non-dumpable. It keeps the host's network
// namespace, which is its job. The engine then loads the steady-state
// seccomp filter (LoadSeccomp) once it is set up.
//
// Its user namespace is its own, not the guest's: the guest's root holds no
// capability over it. Being PID 1 of its own PID namespace, it cannot name,
// signal or trace any other process.

// engineEnvValue of childEnv marks the engine; engineStateEnv carries its
// state (JSON).
const (
	engineEnvValue = "engine"
	engineStateEnv = "_NETNS_RUN_ENGINE_STATE"
)

// engineStopTimeout bounds how long Stop waits for the engine to exit
// before killing it.
const engineStopTimeout = 5 * time.Second

// EngineProcess is a running engine (see StartEngine).
type EngineProcess struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // how it ended; set before done is closed
}

// StartEngine starts the sandboxed engine. files become its descriptors 3,
// 4, ... (in order; see EngineSetup); state is marshalled to JSON. The
// engine gets SIGKILL when the calling thread exits, so call it from a
// thread that lives as long as the engine should (Run's locked one).
func StartEngine(state any, files ...*os.File) (*EngineProcess, error) {
	return startEngine([]string{os.Args[0]}, state, files)
}

// startEngine is StartEngine with the engine's arguments given (a test
// binary needs its -test.run).
func startEngine(args []string, state any, files []*os.File) (*EngineProcess, error) {
	b, err := json.Marshal(state)
	if err != nil {
		return nil, fmt.Errorf("start network engine: encode state: %w", err)
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = args
	cmd.Env = append(engineEnviron(), childEnv+"="+engineEnvValue, engineStateEnv+"="+string(b),
		nsenter.EnvSandbox+"="+nsenter.SandboxEngine, nsenter.EnvSandboxFiles+"="+strconv.Itoa(len(files)))
	cmd.Stderr = os.Stderr
	if st, err := os.Stderr.Stat(); err == nil && st.IsDir() {
		cmd.Stderr = nil // a directory as stderr is a way out of the sandbox
	}
	cmd.ExtraFiles = files
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: unix.CLONE_NEWUSER | unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWIPC,
		// Root inside, so the exec gets the capabilities that building
		// the sandbox takes (the constructor drops them all), and so that
		// our uid owns the engine's /proc entries although it is
		// non-dumpable: the parent reads its descriptors there. Our own
		// group: what the engine reports (ping's group check) names it.
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: os.Getgid(), HostID: os.Getgid(), Size: 1}},
		// Not Setsid, although a session of its own would take away its
		// controlling terminal: with scheduler autogroups (the default
		// on most distributions) a new session is a scheduling group of
		// its own, which on a busy 2-CPU machine raised the 1-byte round
		// trip's median from ~157 to ~178 µs and its p99 to milliseconds.
		// The terminal cannot be used anyway: ioctl (TIOCSTI) is not in
		// the seccomp filter, and the engine ignores its signals.
		Pdeathsig: unix.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start network engine (--no-sandbox runs it unconfined, in netns-run's own process): %w", err)
	}
	p := &EngineProcess{cmd: cmd, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.err = cmd.Wait()
	}()
	return p, nil
}

// engineEnviron is what the engine keeps of our environment: the Go
// runtime's settings, none of the user's variables (tokens and keys live
// there, and the engine has no use for them).
func engineEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "GOMAXPROCS", "GOGC", "GOMEMLIMIT", "GODEBUG", "GOTRACEBACK":
			env = append(env, kv)
		}
	}
	return env
}

// Pid is the engine's process ID (in our PID namespace).
func (p *EngineProcess) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the engine has exited.
func (p *EngineProcess) Done() <-chan struct{} { return p.done }

// Err says how the engine ended, once Done is closed: nil for a clean exit.
func (p *EngineProcess) Err() error { return p.err }

// Stop waits for the engine to exit (the caller has told it to, by closing
// its control connection) and kills it if it takes too long.
func (p *EngineProcess) Stop() error {
	select {
	case <-p.done:
	case <-time.After(engineStopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return errors.New("network engine did not exit; killed it")
	}
	return p.err
}

// IsEngine reports whether this process is the engine started by
// StartEngine. Binaries that use StartEngine check it first thing in main
// and call EngineSetup.
func IsEngine() bool { return os.Getenv(childEnv) == engineEnvValue }

// EngineSetup, in the engine, decodes the state StartEngine was given into
// v and returns the files it was handed, in order. On an error the files
// are still returned, so that the engine can report it to its parent.
func EngineSetup(v any) ([]*os.File, error) {
	n, _ := strconv.Atoi(os.Getenv(nsenter.EnvSandboxFiles))
	files := make([]*os.File, 0, n)
	for i := 0; i < n; i++ {
		files = append(files, os.NewFile(uintptr(3+i), "engine-"+strconv.Itoa(i)))
	}
	return files, sandboxState(os.Getenv(engineStateEnv), v, childEnv, engineStateEnv, nsenter.EnvSandbox, nsenter.EnvSandboxFiles)
}
