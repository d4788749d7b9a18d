package executor

import (
	"slices"
	"testing"
)

func TestSplitRule(t *testing.T) {
	tests := []struct {
		rule string
		want []string
	}{
		{`POSTROUTING -s 10.214.0.2/32 -m comment --comment "name: \"basin-dev-0\" id: \"70f1\"" -j CNI-27dc`,
			[]string{"POSTROUTING", "-s", "10.214.0.2/32", "-m", "comment", "--comment", `name: "basin-dev-0" id: "70f1"`, "-j", "CNI-27dc"}},
		{`CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"basin-dev-1\" id: \"b01f\"" -m multiport --dports 61200 -j CNI-DN-4983`,
			[]string{"CNI-HOSTPORT-DNAT", "-p", "tcp", "-m", "comment", "--comment", `dnat name: "basin-dev-1" id: "b01f"`, "-m", "multiport", "--dports", "61200", "-j", "CNI-DN-4983"}},
		{`X --comment ""`, []string{"X", "--comment", ""}},
		{`A  B`, []string{"A", "B"}},
	}
	for _, tc := range tests {
		if got := splitRule(tc.rule); !slices.Equal(got, tc.want) {
			t.Errorf("splitRule(%q) = %q, want %q", tc.rule, got, tc.want)
		}
	}
}
