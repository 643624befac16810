package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/netns-run/netns-run/launcher/safefs"
	"github.com/netns-run/netns-run/netstack/egress"
)

// EgressFlags are the egress policy options both binaries take.
type EgressFlags struct {
	Allow, Deny []string
	Policy      string
	Audit       bool
	Log         string
}

// EgressHelp describes the options, one "--flag  text" line each, for
// help texts.
const EgressHelp = `--allow=RULE             allow egress to RULE: HOST[:PORTS][/tcp|/udp|/icmp], HOST a name,
                         *.name (below it), **.name (it and below), an address or CIDR
                         ([v6] in brackets); once one exists, everything else is denied
--deny=RULE              deny egress to RULE (wins over --allow)
--policy=FILE            read "allow RULE" / "deny RULE" lines from FILE (# comments)
--egress-audit           decide but block nothing: log what would be denied, and print
                         a suggested allow list at exit
--egress-log=FILE        one JSON line per egress decision to FILE (- for stderr)
`

// Config reads the rules (the policy file first, then --allow, then
// --deny) into a policy configuration; Log and Notices are left to the
// caller. Errors name the rule or file line and what is wrong.
func (f EgressFlags) Config() (egress.Config, error) {
	cfg := egress.Config{Audit: f.Audit}
	if f.Policy != "" {
		fh, err := os.Open(f.Policy)
		if err != nil {
			return cfg, fmt.Errorf("--policy: %w", err)
		}
		rules, err := egress.ParsePolicy(fh, f.Policy)
		fh.Close()
		if err != nil {
			return cfg, fmt.Errorf("--policy: %w", err)
		}
		cfg.Rules = rules
	}
	for _, set := range []struct {
		flag    string
		verdict egress.Verdict
		specs   []string
	}{{"--allow", egress.Allow, f.Allow}, {"--deny", egress.Deny, f.Deny}} {
		for _, s := range set.specs {
			r, err := egress.ParseRule(set.verdict, s)
			if err != nil {
				return cfg, fmt.Errorf("%s: %w", set.flag, err)
			}
			cfg.Rules = append(cfg.Rules, r)
		}
	}
	return cfg, nil
}

// OpenLog opens --egress-log's file (never following a symlink or
// truncating another user's file). It returns nil and toStderr for "-",
// nil and false without the option.
func (f EgressFlags) OpenLog() (file *os.File, toStderr bool, err error) {
	switch f.Log {
	case "":
		return nil, false, nil
	case "-":
		return nil, true, nil
	}
	file, err = safefs.CreateFile(f.Log)
	if err != nil {
		return nil, false, fmt.Errorf("--egress-log: %w", err)
	}
	return file, false, nil
}

// SetEgressOutput sends the policy's decisions to the log file, to stderr
// (--egress-log -), or else as notices of denials to stderr.
func SetEgressOutput(e *egress.Config, log *os.File, logToStderr bool, stderr io.Writer) {
	switch {
	case log != nil:
		e.Log = log
	case logToStderr:
		e.Log = stderr
	default:
		e.Notices = stderr
	}
}

// PrintSuggestion writes audit mode's suggested allow list from a
// get_egress_policy result, as policy file lines.
func PrintSuggestion(w io.Writer, policy any, err error) {
	if err != nil {
		fmt.Fprintf(w, "egress audit: no suggestion: %v\n", err)
		return
	}
	var l egress.Listing
	b, err := json.Marshal(policy)
	if err == nil {
		err = json.Unmarshal(b, &l)
	}
	if err != nil {
		fmt.Fprintf(w, "egress audit: no suggestion: %v\n", err)
		return
	}
	if len(l.Suggested) == 0 {
		fmt.Fprintln(w, "# egress audit: the command used no network destinations")
		return
	}
	fmt.Fprintln(w, "# egress audit: suggested policy (the names and ports used); save it and pass --policy FILE")
	for _, s := range l.Suggested {
		fmt.Fprintln(w, s)
	}
}
