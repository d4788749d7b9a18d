package executor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestLogBufferKeepsTheLastLines(t *testing.T) {
	tests := []struct {
		name   string
		size   int
		append int
		recent int
		want   []string
	}{
		{"fewer than size", 5, 3, 10, []string{"l1", "l2", "l3"}},
		{"wraps around", 3, 7, 10, []string{"l5", "l6", "l7"}},
		{"recent subset", 10, 6, 2, []string{"l5", "l6"}},
		{"empty", 4, 0, 3, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := NewLogBuffer(tc.size, nil)
			for i := 1; i <= tc.append; i++ {
				b.Append(SourceApp, "stdout", fmt.Sprintf("l%d", i))
			}
			var got []string
			for _, l := range b.Recent(tc.recent) {
				got = append(got, l.Text)
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Errorf("Recent(%d) = %v, want %v", tc.recent, got, tc.want)
			}
		})
	}
}

func TestLogBufferFollow(t *testing.T) {
	b := NewLogBuffer(10, func() time.Time { return time.Unix(0, 0) })
	b.Append(SourceCell, "", "creating")
	got := make(chan LogLine)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		errc <- b.Follow(ctx, 0, func(l LogLine) error { got <- l; return nil })
	}()
	if l := <-got; l.Text != "creating" || l.Seq != 1 || l.Source != SourceCell {
		t.Fatalf("first line %+v", l)
	}
	b.Append(SourceApp, "stderr", "oops")
	if l := <-got; l.Text != "oops" || l.Stream != "stderr" || l.Seq != 2 {
		t.Fatalf("followed line %+v", l)
	}
	b.Close()
	if err := <-errc; err != nil {
		t.Fatalf("Follow after Close = %v, want nil", err)
	}
}

func TestLogBufferFollowStopsOnError(t *testing.T) {
	b := NewLogBuffer(10, nil)
	b.Append(SourceApp, "stdout", "a")
	stop := errors.New("stop")
	if err := b.Follow(context.Background(), 0, func(LogLine) error { return stop }); !errors.Is(err, stop) {
		t.Fatalf("Follow = %v, want %v", err, stop)
	}
}

func TestLineWriterSplitsLines(t *testing.T) {
	long := strings.Repeat("x", maxLineBytes+10)
	tests := []struct {
		name   string
		writes []string
		want   []string
	}{
		{"one line", []string{"hello\n"}, []string{"hello"}},
		{"split across writes", []string{"hel", "lo\nwor", "ld\n"}, []string{"hello", "world"}},
		{"crlf", []string{"a\r\nb\n"}, []string{"a", "b"}},
		{"partial flushed", []string{"no newline"}, []string{"no newline"}},
		{"long line split", []string{long + "\n"}, []string{long[:maxLineBytes], long[maxLineBytes:]}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := NewLogBuffer(100, nil)
			w := &lineWriter{buf: b, stream: "stdout"}
			for _, s := range tc.writes {
				if n, err := w.Write([]byte(s)); err != nil || n != len(s) {
					t.Fatalf("Write = %d, %v", n, err)
				}
			}
			w.flush()
			var got []string
			for _, l := range b.Recent(100) {
				got = append(got, l.Text)
			}
			if strings.Join(got, "|") != strings.Join(tc.want, "|") {
				t.Errorf("lines %q, want %q", got, tc.want)
			}
		})
	}
}
