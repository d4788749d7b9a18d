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
