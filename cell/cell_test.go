package cell

import (
	"testing"
)

func TestNumberedCellsDoNotCollide(t *testing.T) {
	base := Config{ID: "dev", StateDir: "/var/lib/basin/dev", ListenAddress: "127.0.0.1:0"}
	seen := map[string]int{}
	for i := range 4 {
		c := Numbered(base, i)
		for _, v := range []string{c.ID, c.StateDir, c.NetworkName + "/net", c.BridgeName + "/br", c.Subnet, c.FirewallChain} {
			if j, ok := seen[v]; ok {
				t.Errorf("cells %d and %d share %q", j, i, v)
			}
			seen[v] = i
		}
		if i > 0 {
			prev := Numbered(base, i-1)
			if c.HostPortLow <= prev.HostPortHigh {
				t.Errorf("cell %d ports %d-%d overlap cell %d's %d-%d", i, c.HostPortLow, c.HostPortHigh, i-1, prev.HostPortLow, prev.HostPortHigh)
			}
		}
		if c.HostPortHigh > 65535 || c.HostPortLow > c.HostPortHigh {
			t.Errorf("cell %d host ports %d-%d", i, c.HostPortLow, c.HostPortHigh)
		}
	}
	if got := Numbered(base, 2); got.ID != "dev-2" || got.StateDir != "/var/lib/basin/dev/dev-2" || got.ListenAddress != "127.0.0.1:0" {
		t.Errorf("Numbered(base, 2) = %+v", got)
	}
}
