package bits

import (
	"archive/zip"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestIgnore(t *testing.T) {
	ig := ParseIgnore("# comment\n*.log\ntmp/\n/build\ndocs/*.md\n!keep.log\n**/cache\n")
	tests := []struct {
		path string
		dir  bool
		want bool
	}{
		{"app.log", false, true},
		{"sub/app.log", false, true},
		{"keep.log", false, false},
		{"tmp", true, true},
		{"tmp", false, false}, // a file named tmp is not the directory
		{"build", true, true},
		{"src/build", true, false}, // anchored at the root
		{"docs/a.md", false, true},
		{"docs/sub/a.md", false, false},
		{"a/b/cache", true, true},
		{".git", true, true},
		{"manifest.yml", false, true},
		{"main.go", false, false},
	}
	for _, tt := range tests {
		if got := ig.Ignored(tt.path, tt.dir); got != tt.want {
			t.Errorf("Ignored(%q, dir=%v) = %v, want %v", tt.path, tt.dir, got, tt.want)
		}
	}
}

func TestWalkAndZip(t *testing.T) {
	root := t.TempDir()
	write := func(rel, content string, mode os.FileMode) {
		p := filepath.Join(root, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("index.html", "hi", 0o644)
	write("bin/run", "#!/bin/sh\n", 0o755)
	write("debug.log", "noise", 0o644)
	write(".git/HEAD", "ref", 0o644)
	write("node_modules/x/y.js", "y", 0o644)
	write(".cfignore", "*.log\nnode_modules/\n", 0o644)
	files, err := Walk(root)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range files {
		paths = append(paths, f.Path)
	}
	if want := []string{"bin/run", "index.html"}; !slices.Equal(paths, want) {
		t.Fatalf("walked %v, want %v", paths, want)
	}
	if files[0].Mode != 0o755 || files[1].Size != 2 ||
		files[1].Digest != "sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4" {
		t.Errorf("file details wrong: %+v", files)
	}
	var buf bytes.Buffer
	if err := Zip(&buf, files); err != nil {
		t.Fatal(err)
	}
	zr, err := zip.NewReader(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if len(zr.File) != 2 || zr.File[0].Name != "bin/run" || zr.File[0].Mode().Perm() != 0o755 {
		t.Errorf("zip holds %v", zr.File)
	}

	// A symlink out of the app is refused with advice.
	if err := os.Symlink("/etc/passwd", filepath.Join(root, "leak")); err != nil {
		t.Fatal(err)
	}
	if _, err := Walk(root); err == nil {
		t.Error("a symlink leaving the app was accepted")
	}
}

func TestIsArchive(t *testing.T) {
	dir := t.TempDir()
	jar := filepath.Join(dir, "app.jar")
	os.WriteFile(jar, []byte("PK"), 0o644)
	if !IsArchive(jar) || IsArchive(dir) || IsArchive(filepath.Join(dir, "missing.zip")) {
		t.Error("IsArchive is wrong")
	}
}
