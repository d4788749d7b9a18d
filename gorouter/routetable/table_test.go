package routetable

import (
	"fmt"
	"sync"
	"testing"
)

func ep(key, host, path, addr string) *Endpoint {
	return &Endpoint{Key: key, Host: host, Path: path, ProcessGUID: key, InstanceGUID: key + "-i", Addr: addr}
}

func put(key, host, path, addr string) Change {
	return Change{Key: key, Endpoint: ep(key, host, path, addr)}
}

func addrs(p *Pool) []string {
	if p == nil {
		return nil
	}
	var out []string
	for _, e := range p.Endpoints {
		out = append(out, e.Addr)
	}
	return out
}

func TestLookup(t *testing.T) {
	tb := New()
	tb.Apply([]Change{
		put("k1", "app.example.com", "", "10.0.0.1:1"),
		put("k2", "app.example.com", "/api", "10.0.0.2:1"),
		put("k3", "app.example.com", "/api/v2/", "10.0.0.3:1"),
		put("k4", "*.example.com", "", "10.0.0.4:1"),
		put("k5", "*.deep.example.com", "", "10.0.0.5:1"),
		put("k6", "Mixed.Example.COM", "", "10.0.0.6:1"),
		put("k7", "onlypath.example.com", "/only", "10.0.0.7:1"),
	})
	cases := []struct {
		host, path string
		want       string // addr, "" for no pool
	}{
		{"app.example.com", "/", "10.0.0.1:1"},
		{"app.example.com", "/apix", "10.0.0.1:1"},
		{"app.example.com", "/api", "10.0.0.2:1"},
		{"app.example.com", "/api/v1", "10.0.0.2:1"},
		{"app.example.com", "/api/v2", "10.0.0.3:1"},
		{"app.example.com", "/api/v2/x/y", "10.0.0.3:1"},
		{"APP.example.com:8080", "/api", "10.0.0.2:1"},
		{"app.example.com.", "/", "10.0.0.1:1"},
		{"other.example.com", "/", "10.0.0.4:1"},
		{"a.b.example.com", "/", "10.0.0.4:1"},
		{"x.deep.example.com", "/", "10.0.0.5:1"},
		{"deep.example.com", "/", "10.0.0.4:1"},
		{"example.com", "/", ""},
		{"mixed.example.com", "/", "10.0.0.6:1"},
		{"onlypath.example.com", "/only/x", "10.0.0.7:1"},
		// A known host without a matching path falls back to the wildcard.
		{"onlypath.example.com", "/else", "10.0.0.4:1"},
		{"nothing.org", "/", ""},
		{"", "/", ""},
	}
	for _, tc := range cases {
		t.Run(tc.host+tc.path, func(t *testing.T) {
			got := addrs(tb.Lookup(tc.host, tc.path))
			switch {
			case tc.want == "" && got != nil:
				t.Fatalf("got %v, want no pool", got)
			case tc.want != "" && (len(got) != 1 || got[0] != tc.want):
				t.Fatalf("got %v, want [%s]", got, tc.want)
			}
		})
	}
	if tb.Len() != 7 {
		t.Fatalf("Len = %d, want 7", tb.Len())
	}
}

func TestApplyAndReplace(t *testing.T) {
	tb := New()
	tb.Apply([]Change{put("a", "h.test", "", "1:1"), put("b", "h.test", "", "2:1"), put("c", "w.test", "", "3:1")})
	if got := addrs(tb.Lookup("h.test", "/")); fmt.Sprint(got) != "[1:1 2:1]" {
		t.Fatalf("after puts: %v", got)
	}
	// A repeated identical put keeps the endpoint and its state.
	first := tb.Lookup("h.test", "/").Endpoints[0]
	first.Acquire()
	tb.Apply([]Change{put("a", "h.test", "", "1:1")})
	if e := tb.Lookup("h.test", "/").Endpoints[0]; e != first || e.Active() != 1 {
		t.Fatalf("identical put replaced the endpoint")
	}
	// A changed address replaces it.
	tb.Apply([]Change{put("a", "h.test", "", "9:1")})
	if got := addrs(tb.Lookup("h.test", "/")); fmt.Sprint(got) != "[9:1 2:1]" {
		t.Fatalf("after change: %v", got)
	}
	// A key moving to another host leaves the old one.
	tb.Apply([]Change{put("b", "other.test", "", "2:1")})
	if got := addrs(tb.Lookup("h.test", "/")); fmt.Sprint(got) != "[9:1]" {
		t.Fatalf("after move: %v", got)
	}
	tb.Apply([]Change{{Key: "a"}, {Key: "never-existed"}})
	if p := tb.Lookup("h.test", "/"); p != nil {
		t.Fatalf("deleted host still routes to %v", addrs(p))
	}
	// Replace: exactly the listed endpoints remain.
	tb.Replace([]*Endpoint{ep("c", "w.test", "", "3:1"), ep("d", "d.test", "", "4:1")})
	for host, want := range map[string]string{"w.test": "[3:1]", "d.test": "[4:1]", "other.test": "[]"} {
		if got := addrs(tb.Lookup(host, "/")); fmt.Sprint(got) != want {
			t.Errorf("after replace %s: %v, want %s", host, got, want)
		}
	}
	if tb.Len() != 2 {
		t.Fatalf("Len = %d, want 2", tb.Len())
	}
}

func TestRoundRobinCounterSurvivesUpdates(t *testing.T) {
	tb := New()
	tb.Apply([]Change{put("a", "h.test", "", "1:1")})
	p1 := tb.Lookup("h.test", "/")
	p1.Next()
	p1.Next()
	tb.Apply([]Change{put("b", "h.test", "", "2:1")})
	if n := tb.Lookup("h.test", "/").Next(); n != 2 {
		t.Fatalf("counter after update = %d, want 2", n)
	}
}

func TestBalancingTag(t *testing.T) {
	tb := New()
	a := ep("a", "h.test", "", "1:1")
	b := ep("b", "h.test", "", "2:1")
	b.Tags = map[string]string{BalancingTag: "least-connections"}
	tb.Apply([]Change{{Key: "a", Endpoint: a}, put("c", "other.test", "", "3:1")})
	if got := tb.Lookup("h.test", "/").Balancing; got != "" {
		t.Fatalf("untagged route balancing %q", got)
	}
	tb.Apply([]Change{{Key: "b", Endpoint: b}})
	if got := tb.Lookup("h.test", "/").Balancing; got != "least-connections" {
		t.Fatalf("tagged route balancing %q", got)
	}
}

func TestPoolFinders(t *testing.T) {
	tb := New()
	e1 := ep("k1", "h.test", "", "1:1")
	e1.ProcessGUID, e1.Index, e1.InstanceGUID = "g", 0, "i0"
	e2 := ep("k2", "h.test", "", "2:1")
	e2.ProcessGUID, e2.Index, e2.InstanceGUID = "g", 1, "i1"
	tb.Apply([]Change{{Key: "k1", Endpoint: e1}, {Key: "k2", Endpoint: e2}})
	p := tb.Lookup("h.test", "/")
	if p.ByInstance("i1") != e2 || p.ByInstance("nope") != nil {
		t.Fatal("ByInstance")
	}
	if p.ByProcessIndex("g", 0) != e1 || p.ByProcessIndex("g", 2) != nil || p.ByProcessIndex("x", 0) != nil {
		t.Fatal("ByProcessIndex")
	}
}

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{"A.B:80": "a.b", "a.b": "a.b", "[::1]:80": "[::1]", "[::1]": "[::1]", "x.": "x"} {
		if got := NormalizeHost(in); got != want {
			t.Errorf("NormalizeHost(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[string]string{"": "", "/": "", "/a/": "/a", "a": "/a", "/a/b": "/a/b"} {
		if got := NormalizePath(in); got != want {
			t.Errorf("NormalizePath(%q) = %q, want %q", in, got, want)
		}
	}
}

// Readers never see a torn pool while a writer churns (run with -race).
func TestConcurrentReadsDuringUpdates(t *testing.T) {
	tb := New()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if p := tb.Lookup("h.test", "/"); p != nil {
					for _, e := range p.Endpoints {
						if e.Host != "h.test" {
							t.Errorf("pool of h.test holds %s", e.Host)
						}
					}
				}
			}
		}()
	}
	for i := 0; i < 2000; i++ {
		k := fmt.Sprint("k", i%10)
		if i%3 == 0 {
			tb.Apply([]Change{{Key: k}})
		} else {
			tb.Apply([]Change{put(k, "h.test", "", fmt.Sprint(i, ":1"))})
		}
	}
	close(stop)
	wg.Wait()
}
