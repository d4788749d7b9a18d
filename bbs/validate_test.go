package bbs

import (
	"strings"
	"testing"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
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

// The cell-call checks build field names only on error; the names and
// messages stay those clients see.
func TestCellRequestChecksNameTheField(t *testing.T) {
	l := DefaultLimits
	k := NewKeys("/p/")
	s := &Store{keys: k}
	okKey := &basinv1.ActualLRPKey{ProcessGuid: "web", Index: 3}
	okIK := &basinv1.ActualLRPInstanceKey{InstanceGuid: "i-1", CellId: "c1"}
	tests := []struct {
		name string
		err  error
		want string // "" for no error
	}{
		{"valid key", l.checkActualKey("key", okKey), ""},
		{"no key", l.checkActualKey("key", nil), "key: is required"},
		{"empty guid", l.checkActualKey("key", &basinv1.ActualLRPKey{}), "key.process_guid: is required"},
		{"bad guid", l.checkActualKey("key", &basinv1.ActualLRPKey{ProcessGuid: "a/b"}),
			`key.process_guid: must be 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit, got "a/b"`},
		{"negative index", l.checkActualKey("key", &basinv1.ActualLRPKey{ProcessGuid: "web", Index: -1}),
			"key.index: must be between 0 and 999, got -1"},
		{"valid instance key", checkInstanceKey("instance_key", okIK), ""},
		{"no instance key", checkInstanceKey("instance_key", nil), "instance_key: is required"},
		{"no instance guid", checkInstanceKey("instance_key", &basinv1.ActualLRPInstanceKey{CellId: "c1"}), "instance_key.instance_guid: is required"},
		{"bad cell id", checkInstanceKey("instance_key", &basinv1.ActualLRPInstanceKey{InstanceGuid: "i", CellId: "-c"}),
			`instance_key.cell_id: must be 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit, got "-c"`},
		{"own fence", s.checkCellFence("fence", "c1", &basinv1.Fence{Key: "/p/cells/c1", CreateRevision: 7}), ""},
		{"another cell's fence", s.checkCellFence("fence", "c1", &basinv1.Fence{Key: "/p/cells/c12", CreateRevision: 7}),
			`fence.key: must be the cell's presence key "/p/cells/c1", got "/p/cells/c12"`},
		{"fence under another prefix", s.checkCellFence("fence", "c1", &basinv1.Fence{Key: "/q/cells/c1", CreateRevision: 7}),
			`fence.key: must be the cell's presence key "/p/cells/c1", got "/q/cells/c1"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := ""
			if tc.err != nil {
				got = tc.err.Error()
			}
			if got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}
