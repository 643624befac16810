package test

import (
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// TestHelpGolden pins the --help and --version texts: usernet's are what
// runtimes probe, netns-run's is its manual. Run with -update after a
// deliberate change and review the diff.
func TestHelpGolden(t *testing.T) {
	cases := []struct {
		name string
		bin  string
		args []string
	}{
		{"netns-run-help", bins.netnsRun, []string{"--help"}},
		{"netns-run-stats-help", bins.netnsRun, []string{"stats", "--help"}},
		{"usernet-help", bins.usernet, []string{"--help"}},
		{"usernet-version", bins.usernet, []string{"--version"}},
	}
	for _, c := range cases {
		if os.Getenv("USERNET_UNDER_TEST") != "" && c.bin == bins.usernet {
			continue
		}
		out, err := exec.Command(c.bin, c.args...).Output()
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		// usernet puts its own path in the usage line, as slirp4netns does.
		got := strings.ReplaceAll(string(out), c.bin, filepath.Base(c.bin))
		golden := filepath.Join("testdata", c.name+".golden")
		if *update {
			if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatalf("%v (run go test ./test -run HelpGolden -update to create it)", err)
		}
		if got != string(want) {
			t.Errorf("%s differs from %s:\n--- got\n%s\n--- want\n%s", c.name, golden, got, want)
		}
	}
}
