// Package ui is how the basin CLI talks to people and scripts: tables for
// people, JSON for scripts, colour only on a terminal, and errors that say
// what failed, why and what to do.
package ui

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// UI writes to one output; colour is on only when it is a terminal and
// NO_COLOR is unset.
type UI struct {
	Out   io.Writer
	Err   io.Writer
	Color bool
	TTY   bool
}

// New returns a UI on out and errOut.
func New(out, errOut io.Writer) *UI {
	tty := IsTerminal(out)
	return &UI{Out: out, Err: errOut, TTY: tty, Color: tty && os.Getenv("NO_COLOR") == ""}
}

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func (u *UI) paint(code, s string) string {
	if !u.Color {
		return s
	}
	return "\x1b[" + code + "m" + s + "\x1b[0m"
}

// Bold, Green, Red, Cyan colour s on a terminal.
func (u *UI) Bold(s string) string  { return u.paint("1", s) }
func (u *UI) Green(s string) string { return u.paint("32", s) }
func (u *UI) Red(s string) string   { return u.paint("31", s) }
func (u *UI) Cyan(s string) string  { return u.paint("36", s) }

// Say prints a line.
func (u *UI) Say(format string, args ...any) { fmt.Fprintf(u.Out, format+"\n", args...) }

// OK prints cf's closing OK.
func (u *UI) OK() { fmt.Fprintln(u.Out, u.Green("OK")) }

// Table prints rows under a header, aligned.
func (u *UI) Table(header []string, rows [][]string) {
	WriteTable(u.Out, header, rows, u.Bold)
}

// WriteTable aligns rows under header in columns two spaces apart; bold
// styles the header.
func WriteTable(w io.Writer, header []string, rows [][]string, bold func(string) string) {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	if len(header) > 0 {
		h := make([]string, len(header))
		for i, c := range header {
			h[i] = bold(c)
		}
		fmt.Fprintln(tw, strings.Join(h, "\t"))
	}
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

// KeyValues prints "key:   value" lines aligned, as cf's app summary.
func (u *UI) KeyValues(kv [][2]string) {
	tw := tabwriter.NewWriter(u.Out, 0, 0, 3, ' ', 0)
	for _, p := range kv {
		fmt.Fprintf(tw, "%s\t%s\n", u.Bold(p[0]+":"), p[1])
	}
	tw.Flush()
}

// JSON prints v as indented JSON; proto messages (and slices of them) use
// protojson with the proto field names.
func (u *UI) JSON(v any) error {
	return WriteJSON(u.Out, v)
}

// WriteJSON is JSON on w.
func WriteJSON(w io.Writer, v any) error {
	conv := func(m proto.Message) json.RawMessage {
		b, _ := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
		return b
	}
	var out any = v
	switch x := v.(type) {
	case proto.Message:
		out = conv(x)
	case []proto.Message:
		list := make([]json.RawMessage, len(x))
		for i, m := range x {
			list[i] = conv(m)
		}
		out = list
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

// Since is how long ago t was, as cf prints it ("2m ago"); "-" for zero.
func Since(nanos int64, now time.Time) string {
	if nanos == 0 {
		return "-"
	}
	t := time.Unix(0, nanos)
	return t.UTC().Format("2006-01-02T15:04:05Z") + " (" + Ago(now.Sub(t)) + ")"
}

// Ago rounds d for people.
func Ago(d time.Duration) string {
	switch {
	case d < 0:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd ago", int(d.Hours()/24))
	}
}

// MB prints a size in MiB as cf does: 256M, 1G.
func MB(mb int64) string {
	if mb >= 1024 && mb%1024 == 0 {
		return fmt.Sprintf("%dG", mb/1024)
	}
	return fmt.Sprintf("%dM", mb)
}

// Bytes prints a byte count for people.
func Bytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fK", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%dB", n)
	}
}
