package buildpacks

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"io"
	"slices"
	"testing"
)

func TestBuiltin(t *testing.T) {
	first, err := Builtin()
	if err != nil {
		t.Fatal(err)
	}
	again, err := Builtin()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i, a := range first {
		names = append(names, a.Name)
		if sha256.Sum256(a.Data) != sha256.Sum256(again[i].Data) {
			t.Errorf("%s: archive differs between two calls", a.Name)
		}
		t.Run(a.Name, func(t *testing.T) {
			zr, err := gzip.NewReader(bytes.NewReader(a.Data))
			if err != nil {
				t.Fatal(err)
			}
			tr := tar.NewReader(zr)
			modes := map[string]int64{}
			var order []string
			for {
				hdr, err := tr.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				modes[hdr.Name] = hdr.Mode
				order = append(order, hdr.Name)
				if !hdr.ModTime.Equal(mtime) || hdr.Uid != 0 {
					t.Errorf("%s: mtime %v uid %d", hdr.Name, hdr.ModTime, hdr.Uid)
				}
			}
			if !slices.IsSorted(order) {
				t.Errorf("entries not sorted: %v", order)
			}
			for _, script := range []string{"bin/detect", "bin/release"} {
				if modes[script] != 0o755 {
					t.Errorf("%s mode %o, want 755 (entries %v)", script, modes[script], order)
				}
			}
			if modes["bin/compile"] != 0o755 && modes["bin/finalize"] != 0o755 {
				t.Errorf("neither bin/compile nor bin/finalize: %v", order)
			}
		})
	}
	if !slices.Equal(names, []string{"staticfile", "java", "ruby", "nodejs", "go", "python", "php", "binary"}) {
		t.Errorf("order %v", names)
	}
}
