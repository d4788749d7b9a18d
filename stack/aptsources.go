package stack

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// AptSource is one "deb" entry of an apt configuration: a mirror, a suite
// and its components.
type AptSource struct {
	URI        string
	Suite      string
	Components []string
}

// ErrNoMirror is returned when the machine's apt configuration names no
// mirror for the suite a stack is built from.
var ErrNoMirror = errors.New("no apt mirror configured")

// AptSources reads the binary ("deb") sources of the apt configuration under
// root (normally /etc/apt): sources.list and sources.list.d/*.list in the
// one-line format, sources.list.d/*.sources in deb822. Disabled stanzas,
// deb-src entries and non-network URIs (file:, cdrom:) are left out.
func AptSources(root string) ([]AptSource, error) {
	files := []string{filepath.Join(root, "sources.list")}
	for _, pat := range []string{"*.list", "*.sources"} {
		m, err := filepath.Glob(filepath.Join(root, "sources.list.d", pat))
		if err != nil {
			return nil, err
		}
		slices.Sort(m)
		files = append(files, m...)
	}
	var out []AptSource
	for _, f := range files {
		b, err := os.ReadFile(f)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read apt sources: %w", err)
		}
		var got []AptSource
		if strings.HasSuffix(f, ".sources") {
			got = parseDeb822(string(b))
		} else {
			got = parseOneLine(string(b))
		}
		for _, s := range got {
			if strings.HasPrefix(s.URI, "http://") || strings.HasPrefix(s.URI, "https://") {
				out = append(out, s)
			}
		}
	}
	return out, nil
}

func parseOneLine(text string) []AptSource {
	var out []AptSource
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") { // options: [arch=amd64 signed-by=...]
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) == 0 {
				continue
			}
			f = f[1:]
		}
		if len(f) < 2 {
			continue
		}
		out = append(out, AptSource{URI: f[0], Suite: f[1], Components: f[2:]})
	}
	return out
}

func parseDeb822(text string) []AptSource {
	var out []AptSource
	flush := func(st map[string]string) {
		if len(st) == 0 || strings.EqualFold(st["enabled"], "no") {
			return
		}
		if !slices.Contains(strings.Fields(st["types"]), "deb") {
			return
		}
		for _, uri := range strings.Fields(st["uris"]) {
			for _, suite := range strings.Fields(st["suites"]) {
				out = append(out, AptSource{URI: uri, Suite: suite, Components: strings.Fields(st["components"])})
			}
		}
	}
	st := map[string]string{}
	last := ""
	for line := range strings.Lines(text + "\n") {
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.TrimSpace(line) == "":
			flush(st)
			st, last = map[string]string{}, ""
		case strings.HasPrefix(line, "#"):
		case line[0] == ' ' || line[0] == '\t': // continuation
			if last != "" {
				st[last] += " " + strings.TrimSpace(line)
			}
		default:
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.ToLower(strings.TrimSpace(k))
			st[last] = strings.TrimSpace(v)
		}
	}
	return out
}

// suiteSources keeps the sources of suite and its companions
// (suite-updates, suite-security, suite/updates), main suite first.
func suiteSources(all []AptSource, suite string) []AptSource {
	var main, rest []AptSource
	for _, s := range all {
		switch {
		case s.Suite == suite:
			main = append(main, s)
		case strings.HasPrefix(s.Suite, suite+"-") || strings.HasPrefix(s.Suite, suite+"/"):
			rest = append(rest, s)
		}
	}
	return append(main, rest...)
}
