package bbs

import (
	"strings"
	"testing"
)

func TestIsGUID(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"a", true}, {"app-1.web_2", true}, {"A9", true}, {strings.Repeat("a", 128), true},
		{"", false}, {strings.Repeat("a", 129), false}, {"-a", false}, {".a", false}, {"_a", false},
		{"a/b", false}, {"a b", false}, {"é", false}, {"a\x00", false},
	}
	for _, tc := range tests {
		if got := isGUID(tc.in); got != tc.want {
			t.Errorf("isGUID(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestDesiredPart(t *testing.T) {
	k := NewKeys("/p/")
	tests := []struct {
		key, guid, part string
		ok              bool
	}{
		{k.DesiredSchedule("web-1"), "web-1", "schedule", true},
		{k.DesiredRun("web-1"), "web-1", "run", true},
		{"/p/desired/other/web-1", "", "", false},
		{"/p/desired/schedule/", "", "", false},
		{"/p/desired/run/a/b", "", "", false},
	}
	for _, tc := range tests {
		guid, part, ok := k.DesiredPart(tc.key)
		if guid != tc.guid || part != tc.part || ok != tc.ok {
			t.Errorf("DesiredPart(%q) = %q, %q, %v; want %q, %q, %v", tc.key, guid, part, ok, tc.guid, tc.part, tc.ok)
		}
	}
}
