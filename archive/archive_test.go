package archive

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// ent describes one tar entry of a test archive.
type ent struct {
	name   string
	typ    byte
	body   string
	link   string
	mode   int64
	size   int64 // overrides len(body) in the header when non-zero
	repeat int   // body repeated this many times when non-zero
}

func makeTar(t *testing.T, ents []ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		body := []byte(e.body)
		if e.repeat > 0 {
			body = bytes.Repeat(body, e.repeat)
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		hdr := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: mode, Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			hdr.Size = int64(len(body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatalf("write header %s: %v", e.name, err)
		}
		if e.typ == tar.TypeReg {
			if _, err := tw.Write(body); err != nil {
				t.Fatalf("write body %s: %v", e.name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gz(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestExtractTarRefusals(t *testing.T) {
	tests := []struct {
		name    string
		ents    []ent
		limits  Limits
		wantErr error
	}{
		{"dot-dot entry", []ent{{name: "../evil", typ: tar.TypeReg, body: "x"}}, Limits{}, ErrUnsafePath},
		{"nested dot-dot", []ent{{name: "a/../../evil", typ: tar.TypeReg, body: "x"}}, Limits{}, ErrUnsafePath},
		{"absolute path", []ent{{name: "/etc/evil", typ: tar.TypeReg, body: "x"}}, Limits{}, ErrUnsafePath},
		{"symlink out of root", []ent{{name: "l", typ: tar.TypeSymlink, link: "../../etc"}}, Limits{}, ErrUnsafePath},
		{"symlink absolute", []ent{{name: "l", typ: tar.TypeSymlink, link: "/etc"}}, Limits{}, ErrUnsafePath},
		{"write through symlink to outside", []ent{
			{name: "l", typ: tar.TypeSymlink, link: "../outside"},
			{name: "l/evil", typ: tar.TypeReg, body: "x"},
		}, Limits{}, ErrUnsafePath},
		{"write through symlink inside root", []ent{
			{name: "d", typ: tar.TypeDir, mode: 0o755},
			{name: "l", typ: tar.TypeSymlink, link: "d"},
			{name: "l/file", typ: tar.TypeReg, body: "x"},
		}, Limits{}, ErrUnsafePath},
		{"hard link out of root", []ent{{name: "h", typ: tar.TypeLink, link: "../outside/secret"}}, Limits{}, ErrUnsafePath},
		{"hard link to absolute", []ent{{name: "h", typ: tar.TypeLink, link: "/etc/passwd"}}, Limits{}, ErrUnsafePath},
		{"char device", []ent{{name: "null", typ: tar.TypeChar}}, Limits{}, ErrForbiddenType},
		{"block device", []ent{{name: "sda", typ: tar.TypeBlock}}, Limits{}, ErrForbiddenType},
		{"fifo", []ent{{name: "pipe", typ: tar.TypeFifo}}, Limits{}, ErrForbiddenType},
		{"too many entries", []ent{
			{name: "a", typ: tar.TypeReg}, {name: "b", typ: tar.TypeReg}, {name: "c", typ: tar.TypeReg},
		}, Limits{MaxEntries: 2}, ErrLimit},
		{"too large", []ent{{name: "big", typ: tar.TypeReg, body: "x", repeat: 4096}}, Limits{MaxBytes: 1024}, ErrLimit},
		{"file replaces directory", []ent{
			{name: "d", typ: tar.TypeDir, mode: 0o755},
			{name: "d", typ: tar.TypeReg, body: "x"},
		}, Limits{}, ErrUnsafePath},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			dir := filepath.Join(parent, "root")
			outside := filepath.Join(parent, "outside")
			for _, d := range []string{dir, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("s"), 0o600); err != nil {
				t.Fatal(err)
			}
			data := gz(t, makeTar(t, tc.ents))
			err := ExtractTarGz(context.Background(), bytes.NewReader(data), dir, WithLimits(tc.limits))
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("ExtractTarGz error = %v, want %v", err, tc.wantErr)
			}
			entries, _ := os.ReadDir(outside)
			if len(entries) != 1 {
				t.Errorf("outside dir was written: %v", entries)
			}
			if _, err := os.Lstat(filepath.Join(parent, "evil")); err == nil {
				t.Errorf("file written next to the root")
			}
		})
	}
}

func TestExtractDecompressionBomb(t *testing.T) {
	// 64 MiB of zeros compress to ~64 KiB: a ratio of ~1000.
	raw := makeTar(t, []ent{{name: "zeros", typ: tar.TypeReg, body: "\x00", repeat: 64 << 20}})
	data := gz(t, raw)
	dir := t.TempDir()
	err := ExtractTarGz(context.Background(), bytes.NewReader(data), dir)
	if !errors.Is(err, ErrLimit) {
		t.Fatalf("ExtractTarGz error = %v, want %v", err, ErrLimit)
	}
	if fi, err := os.Stat(filepath.Join(dir, "zeros")); err == nil && fi.Size() > 32<<20 {
		t.Errorf("bomb unpacked %d bytes before being stopped", fi.Size())
	}
}

func TestExtractTarGzAccepts(t *testing.T) {
	ents := []ent{
		{name: "./", typ: tar.TypeDir, mode: 0o755},
		{name: "app/", typ: tar.TypeDir, mode: 0o755},
		{name: "app/run.sh", typ: tar.TypeReg, body: "#!/bin/sh\necho hi\n", mode: 0o4755},
		{name: "app/link", typ: tar.TypeSymlink, link: "run.sh"},
		{name: "app/up", typ: tar.TypeSymlink, link: "../profile.d"},
		{name: "deep/er/file", typ: tar.TypeReg, body: "nested"},
		{name: "hard", typ: tar.TypeLink, link: "deep/er/file"},
		{name: "app/run.sh", typ: tar.TypeReg, body: "replaced", mode: 0o755},
	}
	dir := t.TempDir()
	data := gz(t, makeTar(t, ents))
	if err := ExtractTarGz(context.Background(), bytes.NewReader(data), dir); err != nil {
		t.Fatalf("ExtractTarGz: %v", err)
	}
	checks := []struct {
		path, want string
		mode       fs.FileMode
	}{
		{"app/run.sh", "replaced", 0o755},
		{"app/link", "replaced", 0o755},
		{"deep/er/file", "nested", 0o644},
		{"hard", "nested", 0o644},
	}
	for _, c := range checks {
		b, err := os.ReadFile(filepath.Join(dir, c.path))
		if err != nil || string(b) != c.want {
			t.Errorf("%s = %q, %v; want %q", c.path, b, err, c.want)
		}
		fi, _ := os.Stat(filepath.Join(dir, c.path))
		if fi != nil && fi.Mode() != c.mode {
			t.Errorf("%s mode = %v, want %v", c.path, fi.Mode(), c.mode)
		}
	}
}

func TestExtractFileOverSymlinkDoesNotFollow(t *testing.T) {
	dir := t.TempDir()
	ents := []ent{
		{name: "target", typ: tar.TypeReg, body: "original"},
		{name: "l", typ: tar.TypeSymlink, link: "target"},
		{name: "l", typ: tar.TypeReg, body: "new"},
	}
	if err := ExtractTar(context.Background(), bytes.NewReader(makeTar(t, ents)), dir); err != nil {
		t.Fatalf("ExtractTar: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "target")); string(b) != "original" {
		t.Errorf("target = %q: the file was written through the link", b)
	}
	if fi, _ := os.Lstat(filepath.Join(dir, "l")); fi == nil || !fi.Mode().IsRegular() {
		t.Errorf("l is not a regular file after being replaced")
	}
}

func makeZip(t *testing.T, files map[string]string, links map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range files {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(body))
	}
	for name, target := range links {
		h := &zip.FileHeader{Name: name}
		h.SetMode(fs.ModeSymlink | 0o777)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(target))
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestExtractZip(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		links   map[string]string
		wantErr error
	}{
		{"ok", map[string]string{"app/index.html": "hello", "Procfile": "web: x"}, map[string]string{"app/l": "index.html"}, nil},
		{"dot-dot", map[string]string{"../evil": "x"}, nil, ErrUnsafePath},
		{"absolute", map[string]string{"/evil": "x"}, nil, ErrUnsafePath},
		{"symlink out", nil, map[string]string{"l": "../../etc"}, ErrUnsafePath},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			data := makeZip(t, tc.files, tc.links)
			err := Extract(context.Background(), bytes.NewReader(data), int64(len(data)), dir)
			if !errors.Is(err, tc.wantErr) && !(err == nil && tc.wantErr == nil) {
				t.Fatalf("Extract error = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr == nil {
				if b, _ := os.ReadFile(filepath.Join(dir, "app/l")); string(b) != "hello" {
					t.Errorf("app/l = %q, want hello", b)
				}
			}
		})
	}
}

func TestExtractDetectsFormat(t *testing.T) {
	raw := makeTar(t, []ent{{name: "f", typ: tar.TypeReg, body: "x"}})
	tests := []struct {
		name    string
		data    []byte
		wantErr error
	}{
		{"tar", raw, nil},
		{"tar.gz", gz(t, raw), nil},
		{"garbage", []byte("hello, not an archive"), ErrFormat},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Extract(context.Background(), bytes.NewReader(tc.data), int64(len(tc.data)), t.TempDir())
			if !errors.Is(err, tc.wantErr) && !(err == nil && tc.wantErr == nil) {
				t.Fatalf("Extract error = %v, want %v", err, tc.wantErr)
			}
		})
	}
}
