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
}
