package launcher

import (
	"os/user"
	"reflect"
	"strings"
	"testing"
)

func TestSubIDs(t *testing.T) {
	u := &user.User{Username: "alice"}
	file := "bob:100000:65536\nalice:200000:65536\n1000:300000:10\nalice:bad:1\nalice:400000:0\n"
	got := subIDs(strings.NewReader(file), u, "1000")
	want := [][2]int{{200000, 65536}, {300000, 10}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestBuildMap(t *testing.T) {
	// Root inside: own id at 0, the range from 1.
	got := buildMap(1000, 0, [][2]int{{100000, 65536}})
	want := []idRange{{0, 1000, 1}, {1, 100000, 65536}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("root: got %v", got)
	}
	// --map-user=1000: 0..999 and 1001.. from the range, around our id.
	got = buildMap(1000, 1000, [][2]int{{100000, 65536}})
	want = []idRange{{1000, 1000, 1}, {0, 100000, 1000}, {1001, 101000, 64536}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("map-user: got %v", got)
	}
	// A range that holds our own id maps around it, not over it.
	got = buildMap(1000, 0, [][2]int{{999, 3}})
	want = []idRange{{0, 1000, 1}, {1, 999, 1}, {2, 1001, 1}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("own id inside a range: got %v", got)
	}
	// Within the kernel's bounds: ids below 2^32-1, at most 340 lines.
	got = buildMap(1000, 0, [][2]int{{100000, 1 << 33}})
	if last := got[len(got)-1]; last.inside+last.count-1 > maxID {
		t.Errorf("a huge range maps ids up to %d", last.inside+last.count-1)
	}
	var many [][2]int
	for i := range 1000 {
		many = append(many, [2]int{100000 + 2*i, 1})
	}
	if got = buildMap(1000, 0, many); len(got) > maxIDMapLines {
		t.Errorf("%d lines", len(got))
	}
}
