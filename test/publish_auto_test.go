package test

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestPublishAuto: netns-run -p auto publishes every port the command
// listens on (TCP and UDP), with either port driver, as pasta's -t/-u auto.
func TestPublishAuto(t *testing.T) {
	for _, driver := range []string{"builtin", "netstack"} {
		t.Run(driver, func(t *testing.T) {
			wd := newWorld(t)
			wd.startPublishing("-p", "auto", "--port-driver", driver)
			out := retryInW(t, wd, "tcp through -p auto", "tcp-echo-check", "127.0.0.1:9001", fmt.Sprint(4<<20))
			checkEcho(t, result{stdout: out}, 4<<20)
			if out := retryInW(t, wd, "udp through -p auto", "udp-echo-check", worldAddr+":9002", "50", "1400"); !strings.Contains(out, "datagrams=50") {
				t.Errorf("udp through -p auto: %s", out)
			}
		})
	}
}

// retryInW runs nettool ARGS in W until it succeeds: a port the auto mode
// publishes appears within a second or so of the guest listening; the
// deadline is generous, not a timing check.
func retryInW(t *testing.T, wd *world, what string, args ...string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := exec.Command("ip", append([]string{"netns", "exec", wd.w, bins.nettool}, args...)...).CombinedOutput()
		if err == nil {
			return string(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v\n%s", what, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
