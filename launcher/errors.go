package launcher

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// sysctlHint is one kernel knob that can forbid unprivileged user namespaces.
type sysctlHint struct {
	path    string
	blocked func(value string) bool
	fix     string
}

var userNSKnobs = []sysctlHint{
	{
		path:    "/proc/sys/user/max_user_namespaces",
		blocked: func(v string) bool { return v == "0" },
		fix:     "user namespaces are disabled (user.max_user_namespaces = 0): run `sudo sysctl -w user.max_user_namespaces=28633`",
	},
	{
		path:    "/proc/sys/kernel/unprivileged_userns_clone",
		blocked: func(v string) bool { return v == "0" },
		fix:     "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0): run `sudo sysctl -w kernel.unprivileged_userns_clone=1`",
	},
	{
		path:    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
		blocked: func(v string) bool { return v == "1" },
		fix:     "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1): add an AppArmor profile granting `userns` to this binary, or run `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`",
	},
}

// explainStartError names the fix when creating the namespaces fails.
func explainStartError(err error) error {
	if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.ENOSPC) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EACCES) {
		return fmt.Errorf("start namespace child: %w", err)
	}
	var hints []string
	for _, k := range userNSKnobs {
		b, rerr := os.ReadFile(k.path)
		if rerr == nil && k.blocked(strings.TrimSpace(string(b))) {
			hints = append(hints, k.fix)
		}
	}
	if errors.Is(err, unix.ENOSPC) {
		hints = append(hints, "the limit of user namespaces is reached (user.max_user_namespaces)")
	}
	if len(hints) == 0 {
		hints = append(hints, "the kernel refused to create a user namespace; check user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor/SELinux policy, or seccomp filters of the enclosing container")
	}
	return fmt.Errorf("create user namespace: %w (%s)", err, strings.Join(hints, "; "))
}
