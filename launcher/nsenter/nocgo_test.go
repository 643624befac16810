package nsenter

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestBuildWithoutCgoSaysWhy: a build without cgo (no C compiler, or
// CGO_ENABLED=0) fails and the message names the fix, instead of Go's
// "build constraints exclude all Go files".
func TestBuildWithoutCgoSaysWhy(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	cmd := exec.Command(goBin, "build", "-o", os.DevNull, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatal("build without cgo succeeded; the constructor would be missing")
	}
	for _, want := range []string{"cgo_is_required", "C_compiler", "CGO_ENABLED_1"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("build output lacks %q:\n%s", want, out)
		}
	}
}
