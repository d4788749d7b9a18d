package rep

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
)

type memBlobs struct {
	blobs     map[string][]byte
	downloads atomic.Int64
	uploaded  [][]byte
}

func (m *memBlobs) DownloadBlob(_ context.Context, digest string, w io.Writer) (int64, error) {
	m.downloads.Add(1)
	b, ok := m.blobs[digest]
	if !ok {
		return 0, fmt.Errorf("blob %s not found", digest)
	}
	n, err := w.Write(b)
	return int64(n), err
}

func (m *memBlobs) UploadBlob(_ context.Context, r io.Reader, _ string) (string, int64, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return "", 0, err
	}
	m.uploaded = append(m.uploaded, b)
	return sha(b), int64(len(b)), nil
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// TestStagingOutputIsReadSafely: the builder's output directory is written
// by untrusted code; a result.json that is a link out of it, or a fifo, is
// refused rather than read.
func TestStagingOutputIsReadSafely(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ok.json"), []byte(`{}`), 0o644)
	os.Symlink("/etc/passwd", filepath.Join(dir, "escape.json"))
	os.Symlink("ok.json", filepath.Join(dir, "inside.json"))
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if b, err := readRegular(root, "ok.json", 10); err != nil || string(b) != "{}" {
		t.Errorf("regular file: %q %v", b, err)
	}
	for _, name := range []string{"escape.json", "inside.json", "fifo.json", "missing.json"} {
		if _, err := readRegular(root, name, 10); err == nil {
			t.Errorf("%s was read", name)
		}
	}
	os.WriteFile(filepath.Join(dir, "big.json"), bytes.Repeat([]byte("x"), 11), 0o644)
	if _, err := readRegular(root, "big.json", 10); err == nil {
		t.Error("an oversized file was read")
	}
}

// TestBuildCacheKeepsLinksAsLinks: packing the cache never follows a link.
func TestBuildCacheKeepsLinksAsLinks(t *testing.T) {
	w := &stagingWork{dir: t.TempDir()}
	w.cache = filepath.Join(w.dir, "cache")
	os.MkdirAll(filepath.Join(w.cache, "gems"), 0o755)
	os.WriteFile(filepath.Join(w.cache, "gems", "a.gem"), []byte("gem"), 0o644)
	os.Symlink("/etc/passwd", filepath.Join(w.cache, "passwd"))
	r := &Rep{cfg: Config{MaxDropletBytes: 1 << 20}, log: slog.New(slog.DiscardHandler)}
	up := &memBlobs{}
	if _, err := r.uploadCache(context.Background(), up, w); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(up.uploaded[0]))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	got := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got[h.Name] = fmt.Sprintf("%c %s %s", h.Typeflag, h.Linkname, b)
	}
	want := map[string]string{"gems/": "5  ", "gems/a.gem": "0  gem", "passwd": "2 /etc/passwd "}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("cache archive %q, want %q", got, want)
	}
}

// TestBuildpacksUnpackedOncePerDigest: a buildpack archive is fetched and
// unpacked once per cell; an archive holding one top-level directory is
// used from inside it, with modes vcap can read and run.
func TestBuildpacksUnpackedOncePerDigest(t *testing.T) {
	var raw bytes.Buffer
	zw := gzip.NewWriter(&raw)
	tw := tar.NewWriter(zw)
	tw.WriteHeader(&tar.Header{Name: "bp-main/", Typeflag: tar.TypeDir, Mode: 0o700})
	tw.WriteHeader(&tar.Header{Name: "bp-main/bin/detect", Typeflag: tar.TypeReg, Mode: 0o700, Size: 2})
	tw.Write([]byte("#!"))
	tw.Close()
	zw.Close()
	d := sha(raw.Bytes())
	blobs := &memBlobs{blobs: map[string][]byte{d: raw.Bytes()}}
	c := newBuildpackCache(t.TempDir(), blobs, 1<<20)
	for range 3 {
		root, err := c.get(context.Background(), d)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(root) != "bp-main" {
			t.Fatalf("root %s: want the single top-level directory", root)
		}
		fi, err := os.Stat(filepath.Join(root, "bin", "detect"))
		if err != nil || fi.Mode().Perm() != 0o755 {
			t.Fatalf("bin/detect: %v %v, want mode 0755", fi.Mode(), err)
		}
	}
	if n := blobs.downloads.Load(); n != 1 {
		t.Errorf("%d downloads, want 1", n)
	}
	if _, err := c.get(context.Background(), sha([]byte("other"))); err == nil {
		t.Error("a missing buildpack was found")
	}
}

func TestBuildpackRootKeepsABinOnlyBuildpack(t *testing.T) {
	for name, dirs := range map[string][]string{"bin only": {"bin"}, "wrapped": {"bp-main/bin"}} {
		root := t.TempDir()
		for _, d := range dirs {
			if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		got, err := buildpackRoot(root)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(got, "bin")); err != nil {
			t.Errorf("%s: root %s has no bin/", name, got)
		}
	}
}
