package ui

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestExplain(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want []string // lines the message must hold
		not  []string
	}{
		{
			name: "unreachable API names the address and what to do",
			err:  fmt.Errorf("list apps: %w", status.Error(codes.Unavailable, "connection refused")),
			want: []string{"list apps: connection refused", "127.0.0.1:8889 does not answer", "basin dev up"},
			not:  []string{"rpc error", "code ="},
		},
		{
			name: "invalid argument keeps the field",
			err:  fmt.Errorf("scale app web: %w", status.Error(codes.InvalidArgument, ".instances: must be between 0 and 1000, got -5")),
			want: []string{"scale app web: .instances: must be between 0 and 1000, got -5", "Fix the value"},
		},
		{
			name: "not found",
			err:  fmt.Errorf("show app x: %w", status.Error(codes.NotFound, "app x: not found")),
			want: []string{"show app x: app x: not found", "basin apps"},
		},
		{name: "token", err: status.Error(codes.Unauthenticated, "bad token"), want: []string{"bad token", "basin login"}},
		{name: "conflict", err: status.Error(codes.Aborted, "concurrent modification"), want: []string{"run the command again"}},
		{name: "missing service", err: status.Error(codes.Unimplemented, "unknown service basin.v1.LogService"), want: []string{"does not serve that yet"}},
		{name: "state", err: status.Error(codes.FailedPrecondition, "app web has no droplet"), want: []string{"no droplet", "basin app NAME"}},
		{
			name: "a hint wins over the code's advice",
			err:  WithHint(fmt.Errorf("stage app web: %w", status.Error(codes.Unimplemented, "unknown service")), "Push a droplet with --droplet."),
			want: []string{"stage app web: unknown service", "Push a droplet with --droplet."},
			not:  []string{"does not serve that yet"},
		},
		{name: "plain error stays as is", err: errors.New("no app to push"), want: []string{"no app to push"}},
		{name: "timeout", err: fmt.Errorf("wait: %w", context.DeadlineExceeded), want: []string{"took too long"}},
		{
			name: "joined errors find the status",
			err:  fmt.Errorf("upload: %w", errors.Join(errors.New("EOF"), status.Error(codes.ResourceExhausted, "too large"))),
			want: []string{"A limit was reached"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Explain(tt.err, "127.0.0.1:8889")
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("Explain = %q, lacks %q", got, w)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(got, n) {
					t.Errorf("Explain = %q, holds %q", got, n)
				}
			}
		})
	}
}

func TestTable(t *testing.T) {
	var buf bytes.Buffer
	u := &UI{Out: &buf}
	u.Table([]string{"name", "state"}, [][]string{{"web", "started"}, {"a-much-longer-name", "stopped"}})
	want := "name                 state\nweb                  started\na-much-longer-name   stopped\n"
	if buf.String() != want {
		t.Errorf("table:\n%q\nwant\n%q", buf.String(), want)
	}
}

func TestColourOnlyOnATerminal(t *testing.T) {
	var buf bytes.Buffer
	u := New(&buf, &buf)
	if u.Color || u.TTY || u.Red("x") != "x" {
		t.Error("colour or terminal mode on a buffer")
	}
	c := &UI{Color: true}
	if c.Green("ok") != "\x1b[32mok\x1b[0m" {
		t.Errorf("green is %q", c.Green("ok"))
	}
}

func TestJSON(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteJSON(&buf, &basinv1.App{Name: "web", Instances: 2}); err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{`"name": "web"`, `"instances": 2`, `"memory_mb": "0"`} {
		if !strings.Contains(buf.String(), w) {
			t.Errorf("JSON %s lacks %s", buf.String(), w)
		}
	}
	buf.Reset()
	WriteJSON(&buf, []any{})
	if strings.TrimSpace(buf.String()) != "[]" {
		t.Errorf("empty list printed as %q", buf.String())
	}
}

func TestFormats(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct{ got, want string }{
		{MB(256), "256M"}, {MB(1024), "1G"}, {MB(1536), "1536M"},
		{Bytes(512), "512B"}, {Bytes(2048), "2.0K"}, {Bytes(5 << 20), "5.0M"}, {Bytes(3 << 30), "3.0G"},
		{Since(0, now), "-"},
		{Since(now.Add(-90*time.Second).UnixNano(), now), "2026-01-02T03:02:35Z (1m ago)"},
		{Ago(3 * time.Hour), "3h ago"}, {Ago(72 * time.Hour), "3d ago"}, {Ago(-time.Second), "just now"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}
