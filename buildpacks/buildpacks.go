// Package buildpacks holds basin's built-in buildpacks (Heroku-API bash
// buildpacks, one directory each) and hands them out as archives, so the
// platform can register them as admin buildpacks.
package buildpacks

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"time"
)

// Order is the built-in buildpacks' detection order.
var Order = []string{"staticfile", "java", "ruby", "nodejs", "go", "python", "php", "binary"}

//go:embed staticfile java ruby nodejs go python php binary
var files embed.FS

// Archive is one built-in buildpack: its name and a tar.gz of its directory
// (entries relative to it: bin/detect, ...).
type Archive struct {
	Name string
	Data []byte
}

// mtime is every entry's modification time, so archives are byte-for-byte
// the same on every build and machine and their digests are stable.
var mtime = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// Builtin returns the built-in buildpacks in detection order. Each archive
// is deterministic: entries sorted, files under bin/ mode 0755 and others
// 0644, directories 0755, owner root, fixed times.
func Builtin() ([]Archive, error) {
	out := make([]Archive, 0, len(Order))
	for _, name := range Order {
		data, err := pack(name)
		if err != nil {
			return nil, fmt.Errorf("built-in buildpack %s: %w", name, err)
		}
		out = append(out, Archive{Name: name, Data: data})
	}
	return out, nil
}

// pack writes the tar.gz of one buildpack directory. fs.WalkDir visits in
// lexical order, which makes the order of entries stable.
func pack(name string) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	err = fs.WalkDir(files, name, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := strings.TrimPrefix(strings.TrimPrefix(p, name), "/")
		if rel == "" {
			return nil
		}
		hdr := &tar.Header{Name: rel, ModTime: mtime, Uname: "root", Gname: "root", Format: tar.FormatPAX}
		if d.IsDir() {
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, rel+"/", 0o755
			return tw.WriteHeader(hdr)
		}
		b, err := files.ReadFile(p)
		if err != nil {
			return err
		}
		hdr.Typeflag, hdr.Size, hdr.Mode = tar.TypeReg, int64(len(b)), 0o644
		if path.Dir(rel) == "bin" {
			hdr.Mode = 0o755
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
