package executor

import (
	"bytes"
	"context"
	"sync"
	"time"
)

// Log sources, as Cloud Foundry tags them: the app's own output, or the cell
// speaking about the instance (creating, healthy, crashed).
const (
	SourceApp  = "APP"
	SourceCell = "CELL"
	// SourceStaging tags the output of a staging task (the buildpacks').
	SourceStaging = "STG"
)

// LogLine is one line of an instance's output or of the cell's events.
type LogLine struct {
	Seq    uint64 // increasing per instance, from 1
	Time   time.Time
	Source string // SourceApp or SourceCell
	Stream string // "stdout" or "stderr" for SourceApp, "" for SourceCell
	Text   string
}

// maxLineBytes bounds one line: longer output is split, so a process writing
// without newlines cannot grow the buffer past lines*maxLineBytes.
const maxLineBytes = 16 << 10

// LogBuffer is a bounded ring of an instance's most recent lines that
// readers can follow.
type LogBuffer struct {
	mu     sync.Mutex
	lines  []LogLine // ring of cap lines; next write at next % len
	size   int
	seq    uint64
	notify chan struct{} // closed and replaced on every append
	closed bool
	now    func() time.Time
}

// NewLogBuffer keeps the last n lines.
func NewLogBuffer(n int, now func() time.Time) *LogBuffer {
	if n <= 0 {
		n = 1000
	}
	if now == nil {
		now = time.Now
	}
	return &LogBuffer{lines: make([]LogLine, n), notify: make(chan struct{}), now: now}
}

// Append adds a line; the buffer drops its oldest line when full.
func (b *LogBuffer) Append(source, stream, text string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	b.lines[int((b.seq-1)%uint64(len(b.lines)))] = LogLine{Seq: b.seq, Time: b.now(), Source: source, Stream: stream, Text: text}
	if b.size < len(b.lines) {
		b.size++
	}
	close(b.notify)
	b.notify = make(chan struct{})
}

// Close ends followers once they have read everything.
func (b *LogBuffer) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		b.closed = true
		close(b.notify)
	}
}

// Since returns the buffered lines with Seq > after, oldest first, a channel
// closed when more arrive, and whether the buffer is closed.
func (b *LogBuffer) Since(after uint64) ([]LogLine, <-chan struct{}, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	first := b.seq - uint64(b.size) + 1
	if after+1 > first {
		first = after + 1
	}
	var out []LogLine
	for s := first; s <= b.seq; s++ {
		out = append(out, b.lines[int((s-1)%uint64(len(b.lines)))])
	}
	return out, b.notify, b.closed
}

// Recent returns up to n of the latest lines, oldest first.
func (b *LogBuffer) Recent(n int) []LogLine {
	b.mu.Lock()
	seq := b.seq
	b.mu.Unlock()
	after := uint64(0)
	if uint64(n) < seq {
		after = seq - uint64(n)
	}
	lines, _, _ := b.Since(after)
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

// Follow calls fn for every line with Seq > after, then for each new line as
// it arrives, until ctx ends, fn fails or the buffer is closed and drained.
func (b *LogBuffer) Follow(ctx context.Context, after uint64, fn func(LogLine) error) error {
	for {
		lines, more, closed := b.Since(after)
		for _, l := range lines {
			if err := fn(l); err != nil {
				return err
			}
			after = l.Seq
		}
		if closed && len(lines) == 0 {
			return nil
		}
		if len(lines) > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-more:
		}
	}
}

// lineWriter turns a stream of bytes into lines appended to a LogBuffer.
type lineWriter struct {
	buf    *LogBuffer
	source string // SourceApp unless the spec says otherwise
	stream string
	mu     sync.Mutex
	part   []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.source == "" {
		w.source = SourceApp
	}
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			w.part = append(w.part, p...)
			for len(w.part) >= maxLineBytes {
				w.buf.Append(w.source, w.stream, string(w.part[:maxLineBytes]))
				w.part = append(w.part[:0], w.part[maxLineBytes:]...)
			}
			break
		}
		line := append(w.part, p[:i]...)
		for len(line) > maxLineBytes {
			w.buf.Append(w.source, w.stream, string(line[:maxLineBytes]))
			line = line[maxLineBytes:]
		}
		w.buf.Append(w.source, w.stream, string(bytes.TrimSuffix(line, []byte("\r"))))
		w.part = w.part[:0]
		p = p[i+1:]
	}
	return n, nil
}

// flush emits a trailing partial line, once the stream has ended.
func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.part) > 0 {
		w.buf.Append(w.source, w.stream, string(w.part))
		w.part = w.part[:0]
	}
}
