package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/netns-run/netns-run/netstack/egress"
)

func TestEgressFlagsConfig(t *testing.T) {
	dir := t.TempDir()
	policy := filepath.Join(dir, "ci.policy")
	if err := os.WriteFile(policy, []byte("# build\nallow github.com:443\ndeny 192.0.2.0/24\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := EgressFlags{Policy: policy, Allow: []string{"**.pypi.org:443"}, Deny: []string{"evil.example"}, Audit: true}.Config()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range cfg.Rules {
		got = append(got, r.String())
	}
	if want := "allow github.com:443|deny 192.0.2.0/24|allow **.pypi.org:443|deny evil.example"; strings.Join(got, "|") != want || !cfg.Audit {
		t.Errorf("rules %q, want %q", strings.Join(got, "|"), want)
	}
	if err := os.WriteFile(policy, []byte("allow github.com:443\nallow x:y\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := (EgressFlags{Policy: policy}).Config(); err == nil || !strings.Contains(err.Error(), "ci.policy:2: rule \"x:y\"") {
		t.Errorf("bad policy line: %v", err)
	}
	if _, err := (EgressFlags{Policy: filepath.Join(dir, "missing")}).Config(); err == nil || !strings.HasPrefix(err.Error(), "--policy: ") {
		t.Errorf("missing policy: %v", err)
	}
	if _, err := (EgressFlags{Deny: []string{"[::1"}}).Config(); err == nil || !strings.HasPrefix(err.Error(), "--deny: rule \"[::1\"") {
		t.Errorf("bad --deny: %v", err)
	}
}

func TestPrintSuggestion(t *testing.T) {
	var b bytes.Buffer
	PrintSuggestion(&b, egress.Listing{Suggested: []string{"allow github.com:443"}}, nil)
	if !strings.HasPrefix(b.String(), "# egress audit: suggested policy") || !strings.HasSuffix(b.String(), "\nallow github.com:443\n") {
		t.Errorf("suggestion:\n%s", b.String())
	}
}
