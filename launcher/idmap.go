package launcher

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
)

// idRange maps count ids from outside (host) to inside (namespace).
type idRange struct {
	inside, outside, count int
}

// subIDs returns the subordinate ranges (start, count) listed for the user
// in an /etc/subuid-style file, by name or by numeric id.
func subIDs(r io.Reader, u *user.User, id string) [][2]int {
	var out [][2]int
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Split(strings.TrimSpace(sc.Text()), ":")
		if len(f) != 3 || (f[0] != u.Username && f[0] != id) {
			continue
		}
		start, err1 := strconv.Atoi(f[1])
		count, err2 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil || start < 0 || count <= 0 {
			continue
		}
		out = append(out, [2]int{start, count})
	}
	return out
}

// The kernel's bounds on an id map: lines, and ids (2^32-1 is no id).
const (
	maxIDMapLines = 340
	maxID         = 1<<32 - 2
)

// buildMap puts the caller's own id at inside and fills the ids around it
// from the subordinate ranges, in order: 0..inside-1, then inside+1 on.
// The own id is left out of the ranges (an id mapped twice makes the
// kernel refuse the map), and the map is kept within the kernel's bounds.
func buildMap(own, inside int, sub [][2]int) []idRange {
	m := []idRange{{inside: inside, outside: own, count: 1}}
	var ranges [][2]int
	for _, r := range sub {
		start, end := r[0], r[0]+r[1]
		if own >= start && own < end {
			ranges = append(ranges, [2]int{start, own - start}, [2]int{own + 1, end - own - 1})
		} else {
			ranges = append(ranges, r)
		}
	}
	next := 0
	for _, r := range ranges {
		start, count := r[0], min(r[1], maxID+1-r[0])
		for count > 0 && len(m) < maxIDMapLines && next <= maxID {
			if next == inside {
				next++
				continue
			}
			n := min(count, maxID+1-next)
			if next < inside && next+n > inside {
				n = inside - next
			}
			m = append(m, idRange{inside: next, outside: start, count: n})
			next += n
			start += n
			count -= n
		}
	}
	return m
}

// writeIDMaps gives process pid the full subordinate id ranges of the
// caller (from /etc/subuid and /etc/subgid) through the setuid helpers
// newuidmap and newgidmap, with the caller's own ids at insideUID/insideGID.
func writeIDMaps(pid, insideUID, insideGID int) error {
	u, err := user.Current()
	if err != nil {
		return fmt.Errorf("map subordinate ids: %w", err)
	}
	for _, m := range []struct {
		tool, file string
		own        int
		inside     int
	}{
		{"newuidmap", "/etc/subuid", os.Getuid(), insideUID},
		{"newgidmap", "/etc/subgid", os.Getgid(), insideGID},
	} {
		path, err := exec.LookPath(m.tool)
		if err != nil {
			return fmt.Errorf("map subordinate ids: %s not found: install it (Debian/Ubuntu: apt install uidmap; Fedora: shadow-utils) or drop --map-auto: %w", m.tool, err)
		}
		f, err := os.Open(m.file)
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("map subordinate ids: %s does not exist: add a range with `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 %s`", m.file, u.Username)
		}
		if err != nil {
			return fmt.Errorf("map subordinate ids: %w", err)
		}
		// Both files list ranges by user name or uid (as newgidmap
		// reads /etc/subgid), never by gid.
		sub := subIDs(f, u, strconv.Itoa(os.Getuid()))
		f.Close()
		if len(sub) == 0 {
			return fmt.Errorf("map subordinate ids: no range for %s in %s: add one with `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 %s`", u.Username, m.file, u.Username)
		}
		args := []string{strconv.Itoa(pid)}
		for _, r := range buildMap(m.own, m.inside, sub) {
			args = append(args, strconv.Itoa(r.inside), strconv.Itoa(r.outside), strconv.Itoa(r.count))
		}
		if out, err := exec.Command(path, args...).CombinedOutput(); err != nil {
			return fmt.Errorf("map subordinate ids: %s %s: %w: %s", m.tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
