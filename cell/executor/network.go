package executor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	cni "github.com/containerd/go-cni"
)

// PortMapping maps a container port to a host port on the cell's advertised
// address.
type PortMapping struct {
	ContainerPort uint16 `json:"container_port"`
	HostPort      uint16 `json:"host_port"`
}

// ErrNoPorts: every host port of the configured range is in use.
var ErrNoPorts = errors.New("no free host port")

// network gives each instance its own network namespace through CNI
// (bridge + host-local + portmap, plus loopback) and keeps containers away
// from protected host ports with an iptables chain of its own.
type network struct {
	cni       cni.CNI
	hostIP    string
	subnet    string
	chain     string
	protected []int

	mu        sync.Mutex
	portLow   int
	portHigh  int
	next      int
	allocated map[int]bool
	free      func(port int) bool // whether nothing else listens there
}

// listenable reports whether a port on ip is free by listening on it.
func listenable(ip string) func(int) bool {
	return func(port int) bool {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			return false
		}
		l.Close()
		return true
	}
}

func newNetwork(cfg Config) (*network, error) {
	conflist, err := json.Marshal(map[string]any{
		"cniVersion": "1.0.0",
		"name":       cfg.NetworkName,
		"plugins": []any{
			map[string]any{
				"type":        "bridge",
				"bridge":      cfg.BridgeName,
				"isGateway":   true,
				"ipMasq":      true,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": cfg.Subnet}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": cfg.StateDir + "/ipam",
				},
			},
			// snat lets the host reach a mapping on 127.0.0.1 (it also turns
			// on route_localnet on the bridge for that).
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("cni config: %w", err)
	}
	l, err := cni.New(cni.WithPluginDir([]string{cfg.CNIBinDir}), cni.WithPluginConfDir(cfg.StateDir+"/cni"), cni.WithMinNetworkCount(2))
	if err != nil {
		return nil, fmt.Errorf("cni: %w", err)
	}
	if err := l.Load(cni.WithLoNetwork, cni.WithConfListBytes(conflist)); err != nil {
		return nil, fmt.Errorf("load cni config: %w", err)
	}
	return &network{
		cni: l, hostIP: cfg.AdvertiseAddress, subnet: cfg.Subnet, chain: cfg.FirewallChain,
		protected: cfg.ProtectedPorts, portLow: cfg.HostPortLow, portHigh: cfg.HostPortHigh,
		next: cfg.HostPortLow, allocated: map[int]bool{}, free: listenable(cfg.AdvertiseAddress),
	}, nil
}

// allocate picks n free host ports on the advertised address. A port is free
// when nothing of ours holds it and a listen on it succeeds.
func (n *network) allocate(count int) ([]uint16, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []uint16
	span := n.portHigh - n.portLow + 1
	for tried := 0; tried < span && len(out) < count; tried++ {
		p := n.next
		n.next++
		if n.next > n.portHigh {
			n.next = n.portLow
		}
		if n.allocated[p] {
			continue
		}
		if !n.free(p) {
			continue
		}
		n.allocated[p] = true
		out = append(out, uint16(p))
	}
	if len(out) < count {
		for _, p := range out {
			delete(n.allocated, int(p))
		}
		return nil, fmt.Errorf("allocate %d host ports in %d-%d on %s: %w", count, n.portLow, n.portHigh, n.hostIP, ErrNoPorts)
	}
	return out, nil
}

// reserve marks ports an adopted instance already uses.
func (n *network) reserve(ports []PortMapping) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range ports {
		n.allocated[int(p.HostPort)] = true
	}
}

func (n *network) release(ports []PortMapping) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range ports {
		delete(n.allocated, int(p.HostPort))
	}
}

func (n *network) portMaps(ports []PortMapping) []cni.PortMapping {
	out := make([]cni.PortMapping, 0, len(ports))
	for _, p := range ports {
		out = append(out, cni.PortMapping{HostPort: int32(p.HostPort), ContainerPort: int32(p.ContainerPort), Protocol: "tcp", HostIP: n.hostIP})
	}
	return out
}

// setup attaches the namespace at path and returns the container's IP.
func (n *network) setup(ctx context.Context, id, path string, ports []PortMapping) (string, error) {
	res, err := n.cni.Setup(ctx, id, path, cni.WithCapabilityPortMap(n.portMaps(ports)))
	if err != nil {
		return "", fmt.Errorf("cni setup of %s: %w", id, err)
	}
	for name, iface := range res.Interfaces {
		if name == "lo" || iface.Sandbox == "" {
			continue
		}
		for _, ipc := range iface.IPConfigs {
			if ip4 := ipc.IP.To4(); ip4 != nil {
				return ip4.String(), nil
			}
		}
	}
	return "", fmt.Errorf("cni setup of %s: no IPv4 address in the result", id)
}

// A teardown whose plugin dies (a terminal's Ctrl-C reaches the plugins in
// the cell's process group too) is tried again: a skipped DEL would leave
// the container's NAT rules, and a leftover DNAT takes the traffic of the
// next instance given that host port. Teardown must finish even while the
// cell shuts down, so it does not end with ctx; it is bounded instead.
func (n *network) teardown(ctx context.Context, id, path string, ports []PortMapping) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), teardownTimeout)
	defer cancel()
	var err error
	for attempt := range teardownAttempts {
		if attempt > 0 {
			select {
			case <-time.After(200 * time.Millisecond):
			case <-ctx.Done():
				return fmt.Errorf("cni teardown of %s: %w", id, err)
			}
		}
		if err = n.cni.Remove(ctx, id, path, cni.WithCapabilityPortMap(n.portMaps(ports))); err == nil {
			return nil
		}
	}
	return fmt.Errorf("cni teardown of %s: %w", id, err)
}

const (
	teardownAttempts = 3
	teardownTimeout  = 20 * time.Second
)

// installFirewall rejects connections from the container subnet to the
// protected host ports. Traffic from a container to any of the host's
// addresses passes INPUT, so one jump there covers them all.
func (n *network) installFirewall(ctx context.Context) error {
	if len(n.protected) == 0 {
		return nil
	}
	_ = n.removeFirewall(ctx) // leftovers of a cell that died
	if err := iptables(ctx, "-N", n.chain); err != nil {
		return err
	}
	for _, p := range n.protected {
		if err := iptables(ctx, "-A", n.chain, "-p", "tcp", "--dport", strconv.Itoa(p), "-j", "REJECT", "--reject-with", "tcp-reset"); err != nil {
			return err
		}
	}
	return iptables(ctx, "-I", "INPUT", "1", "-s", n.subnet, "-j", n.chain)
}

func (n *network) removeFirewall(ctx context.Context) error {
	if len(n.protected) == 0 {
		return nil
	}
	var errs []error
	for iptables(ctx, "-C", "INPUT", "-s", n.subnet, "-j", n.chain) == nil {
		if err := iptables(ctx, "-D", "INPUT", "-s", n.subnet, "-j", n.chain); err != nil {
			errs = append(errs, err)
			break
		}
	}
	if iptables(ctx, "-n", "-L", n.chain) == nil {
		errs = append(errs, iptables(ctx, "-F", n.chain), iptables(ctx, "-X", n.chain))
	}
	return errors.Join(errs...)
}

func iptables(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "iptables", append([]string{"-w", "5"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// RemoveLeftoverNAT deletes the nat rules CNI plugins wrote for this
// executor's network that no teardown removed (a plugin killed mid-DEL, a
// DEL that could not find its namespace): a leftover DNAT takes the traffic
// of the next instance given that host port. Call it only when no instance
// of the network runs, as cell.Purge does.
func (e *Executor) RemoveLeftoverNAT(ctx context.Context) error {
	return removeNATRulesOf(ctx, e.cfg.NetworkName)
}

// removeNATRulesOf deletes, from the chains CNI's bridge and portmap
// plugins write to, every rule whose comment names network, with the
// per-container chain it jumps to.
func removeNATRulesOf(ctx context.Context, network string) error {
	mark := `name: \"` + network + `\"`
	var errs []error
	for _, chain := range []string{"CNI-HOSTPORT-DNAT", "POSTROUTING"} {
		out, err := exec.CommandContext(ctx, "iptables", "-w", "5", "-t", "nat", "-S", chain).Output()
		if err != nil {
			continue // no such chain: nothing of ours there
		}
		var rules []string
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "-A ") {
				rules = append(rules, line)
			}
		}
		for _, rule := range rules {
			if !strings.Contains(rule, mark) {
				continue
			}
			// Deleted by specification, not position: other cells may
			// change the chain meanwhile.
			args := append([]string{"-t", "nat", "-D"}, splitRule(strings.TrimPrefix(rule, "-A "))...)
			if err := iptables(ctx, args...); err != nil {
				errs = append(errs, err)
				continue
			}
			if j := strings.Index(rule, "-j CNI-"); j >= 0 {
				target := strings.Fields(rule[j+3:])[0]
				if !strings.HasPrefix(target, "CNI-HOSTPORT-") {
					_ = iptables(ctx, "-t", "nat", "-F", target)
					_ = iptables(ctx, "-t", "nat", "-X", target)
				}
			}
		}
	}
	// A per-container chain whose jump is already gone (a DEL or ADD cut
	// short) is found by the network named in its own rules.
	if out, err := exec.CommandContext(ctx, "iptables", "-w", "5", "-t", "nat", "-S").Output(); err == nil {
		ours, jumpedTo := map[string]bool{}, map[string]bool{}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "-A" {
				continue
			}
			if strings.HasPrefix(f[1], "CNI-") && !strings.HasPrefix(f[1], "CNI-HOSTPORT-") && strings.Contains(line, mark) {
				ours[f[1]] = true
			}
			if j := slices.Index(f, "-j"); j >= 0 && j+1 < len(f) {
				jumpedTo[f[j+1]] = true
			}
		}
		for chain := range ours {
			if !jumpedTo[chain] { // a running container's chain stays
				_ = iptables(ctx, "-t", "nat", "-F", chain)
				_ = iptables(ctx, "-t", "nat", "-X", chain)
			}
		}
	}
	return errors.Join(errs...)
}

// splitRule splits a rule as iptables -S prints it into arguments: words
// apart from double-quoted strings, in which \" is a quote.
func splitRule(rule string) []string {
	var args []string
	var cur strings.Builder
	inQuote, inWord := false, false
	for i := 0; i < len(rule); i++ {
		c := rule[i]
		switch {
		case inQuote && c == '\\' && i+1 < len(rule) && (rule[i+1] == '"' || rule[i+1] == '\\'):
			i++
			cur.WriteByte(rule[i])
		case c == '"':
			inQuote, inWord = !inQuote, true
		case c == ' ' && !inQuote:
			if inWord {
				args = append(args, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		args = append(args, cur.String())
	}
	return args
}
