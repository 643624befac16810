package launcher

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/ktcpnat"
)

// natBrokerEnvValue of childEnv marks the re-executed broker of the kernel
// TCP path's in-kernel translation (package ktcpnat): usernet's sandbox
// holds no capability in the guest's user namespace, so a small process
// that stays outside applies its changes. Its connection is descriptor 3,
// the netlink socket 4.
const natBrokerEnvValue = "natbroker"

// natBrokerPortEnv tells the broker the listener's port (ktcpnat.Serve).
const natBrokerPortEnv = "_NETNS_RUN_NAT_LISTENER_PORT"

// StartNATBroker starts a broker process for the netlink socket nat (which
// it closes here) and returns the connection to it, for
// netstack.Config.KernelTCPNAT in the sandbox. The broker exits when the
// connection's last holder closes it.
func StartNATBroker(nat *os.File, listenerPort uint16) (*os.File, error) {
	defer nat.Close()
	ours, theirs, err := ktcpnat.Pair()
	if err != nil {
		return nil, fmt.Errorf("start nat broker: %w", err)
	}
	defer theirs.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{os.Args[0]}
	cmd.Env = append(os.Environ(), childEnv+"="+natBrokerEnvValue, natBrokerPortEnv+"="+strconv.Itoa(int(listenerPort)))
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = []*os.File{theirs, nat}
	if err := cmd.Start(); err != nil {
		ours.Close()
		return nil, fmt.Errorf("start nat broker: %w", err)
	}
	// Not waited for, as the remover: this image is about to be replaced
	// by the sandboxed one.
	_ = cmd.Process.Release()
	return ours, nil
}

// runNATBroker is the broker process.
func runNATBroker() int {
	// It ends with the helper (the connection's end), not with a Ctrl-C
	// meant for the helper's process group.
	signal.Ignore(unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT)
	conn := os.NewFile(3, "nat-broker")
	m := ktcpnat.NewMap(os.NewFile(4, "nftables"))
	defer m.Close()
	defer conn.Close()
	port, err := strconv.ParseUint(os.Getenv(natBrokerPortEnv), 10, 16)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nat broker: listener port: %v\n", err)
		return 1
	}
	if err := ktcpnat.Serve(conn, m, uint16(port)); err != nil {
		fmt.Fprintf(os.Stderr, "nat broker: %v\n", err)
		return 1
	}
	return 0
}
