package executor

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"strconv"
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

// A network's per-container NAT chain left without its jump is removed; one
// still jumped to (a running container's) stays. Needs root and iptables.
func TestRemoveNATRulesOfOrphanChains(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to change iptables")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("iptables not installed (run scripts/setup.sh as root)")
	}
	ctx := context.Background()
	id := strconv.Itoa(os.Getpid())
	network := "basin-nattest-" + id
	orphan, live, parent := "CNI-bt"+id+"orphan", "CNI-bt"+id+"live", "BASINTEST-"+id
	comment := `name: "` + network + `" id: "x"`
	run := func(args ...string) {
		t.Helper()
		if err := iptables(ctx, append([]string{"-t", "nat"}, args...)...); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, c := range []string{parent, live, orphan} {
			_ = iptables(ctx, "-t", "nat", "-F", c)
		}
		for _, c := range []string{parent, live, orphan} {
			_ = iptables(ctx, "-t", "nat", "-X", c)
		}
	})
	for _, c := range []string{orphan, live, parent} {
		run("-N", c)
	}
	for _, c := range []string{orphan, live} {
		run("-A", c, "-d", "10.254.0.0/24", "-m", "comment", "--comment", comment, "-j", "ACCEPT")
	}
	run("-A", parent, "-j", live)
	if err := removeNATRulesOf(ctx, network); err != nil {
		t.Fatal(err)
	}
	has := func(chain string) bool {
		return iptables(ctx, "-t", "nat", "-S", chain) == nil
	}
	if has(orphan) {
		t.Error("the orphaned chain is still there")
	}
	if !has(live) {
		t.Error("the chain a rule still jumps to was removed")
	}
}
