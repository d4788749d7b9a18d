package containerdproc

import (
	"context"
	"os"
	"testing"

	"github.com/containerd/containerd/v2/client"
)

func TestStartAnswersAndStops(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	if err := Binaries(); err != nil {
		t.Skip(err)
	}
	dir, err := ShortDir("basin-ctrd-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	ctx, cancel := context.WithCancel(context.Background())
	d, err := Start(ctx, Config{Dir: dir, Output: &testWriter{t}})
	if err != nil {
		cancel()
		t.Fatalf("Start: %v", err)
	}
	c, err := client.New(d.Address())
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	v, err := c.Version(ctx)
	c.Close()
	if err != nil {
		t.Fatalf("Version: %v", err)
	}
	t.Logf("containerd %s (pid %d) on %s", v.Version, d.PID(), d.Address())

	cancel()
	<-d.Stopped()
	select {
	case <-d.Done():
	default:
		t.Fatal("Stopped closed while the process still runs")
	}
}

type testWriter struct{ t *testing.T }

func (w *testWriter) Write(p []byte) (int, error) {
	w.t.Logf("containerd: %s", p)
	return len(p), nil
}
