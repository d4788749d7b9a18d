package bbs

import "testing"

// The per-transition keys are built in one concatenation; they must stay the
// layout the prefixes and parsers agree on.
func TestKeyLayout(t *testing.T) {
	k := NewKeys("/p")
	tests := []struct {
		got, want string
	}{
		{k.Actual("web", 7), "/p/actual/web/7"},
		{k.Actual("web", 1234), k.ActualLRPPrefix("web") + "1234"},
		{k.CellIndex("c1", "web", 7), "/p/index/cell/c1/web/7"},
		{k.CellIndex("c1", "web", 250), k.CellIndexPrefix("c1") + "web/250"},
		{k.Unclaimed("web", 7), "/p/index/unclaimed/web/7"},
		{k.Unclaimed("web", 250), k.UnclaimedPrefix() + "web/250"},
	}
	for _, tc := range tests {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
	if guid, idx, ok := k.ParseActual(k.Actual("web", 250)); !ok || guid != "web" || idx != 250 {
		t.Errorf("ParseActual: %q %d %v", guid, idx, ok)
	}
	if cell, guid, idx, ok := k.ParseCellIndex(k.CellIndex("c1", "web", 250)); !ok || cell != "c1" || guid != "web" || idx != 250 {
		t.Errorf("ParseCellIndex: %q %q %d %v", cell, guid, idx, ok)
	}
	if guid, idx, ok := k.ParseUnclaimed(k.Unclaimed("web", 250)); !ok || guid != "web" || idx != 250 {
		t.Errorf("ParseUnclaimed: %q %d %v", guid, idx, ok)
	}
}
