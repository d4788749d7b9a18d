package bbs

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/basinpaas/basin/archive"
	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// packageMTime is every entry's modification time in an assembled package,
// so the same files always make the same bytes (and digest).
var packageMTime = time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)

// maxResourceFiles bounds MatchResources and the matched files of one upload.
const maxResourceFiles = 100_000

// pkgEntry is one entry of an app package being assembled.
type pkgEntry struct {
	kind   byte // tar.TypeReg, tar.TypeDir or tar.TypeSymlink
	mode   int64
	size   int64
	target string // symlink target
	file   string // regular file: local path of the uploaded copy...
	digest string // ...or the blob it comes from (matched)
}

// checkRelPath accepts a slash-separated path relative to the app's root
// with no "..", "." or empty component.
func checkRelPath(field, p string) error {
	switch {
	case p == "":
		return fieldErr(field, "is required")
	case len(p) > 4096:
		return fieldErr(field, "must be at most 4096 bytes")
	case strings.HasPrefix(p, "/") || strings.Contains(p, `\`):
		return fieldErr(field, "must be a relative slash-separated path, got %q", p)
	case strings.ContainsRune(p, 0):
		return fieldErr(field, "must not contain NUL")
	}
	for _, c := range strings.Split(p, "/") {
		if c == "" || c == "." || c == ".." {
			return fieldErr(field, "must not contain empty, \".\" or \"..\" components, got %q", p)
		}
	}
	return nil
}

func checkResourceFile(field string, f *basinv1.ResourceFile) error {
	if err := checkRelPath(field+".path", f.GetPath()); err != nil {
		return err
	}
	if err := blobstore.CheckDigest(f.GetDigest()); err != nil {
		return fieldErr(field+".digest", "%v", err)
	}
	if f.GetSize() < 0 {
		return fieldErr(field+".size", "must not be negative, got %d", f.GetSize())
	}
	if f.GetMode() > 0o7777 {
		return fieldErr(field+".mode", "must be permission bits (at most 07777), got %o", f.GetMode())
	}
	return nil
}

// archiveErr turns an archive refusal into an InvalidArgument naming the
// problem; other errors pass unchanged.
func archiveErr(err error) error {
	if errors.Is(err, archive.ErrFormat) && strings.HasPrefix(err.Error(), "extract into ") {
		// The message would name the server's work directory.
		return fieldErr("archive", "refused: %v: not a zip, tar.gz or tar archive", archive.ErrFormat)
	}
	for _, e := range []error{archive.ErrUnsafePath, archive.ErrForbiddenType, archive.ErrLimit, archive.ErrFormat} {
		if errors.Is(err, e) {
			return fieldErr("archive", "refused: %v", err)
		}
	}
	return err
}

// bitsAssembler turns an uploaded archive plus matched blobs into a package.
type bitsAssembler struct {
	blobs  blobstore.Store
	tmp    string
	limits archive.Limits
	max    int64 // largest package blob
}

// assemble unpacks the archive at src (size bytes; none when size is 0)
// with every check of package archive, stores each of its regular files as
// a blob, adds the matched files, and stores the package: a tar.gz of every
// entry in path order with fixed times and owners, modes kept.
func (b *bitsAssembler) assemble(ctx context.Context, src *os.File, size int64, matched []*basinv1.ResourceFile) (*basinv1.UploadBitsResponse, error) {
	work, err := os.MkdirTemp(b.tmp, "bits-")
	if err != nil {
		return nil, fmt.Errorf("bits work dir: %w", err)
	}
	defer os.RemoveAll(work)
	root := filepath.Join(work, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		return nil, fmt.Errorf("bits work dir: %w", err)
	}
	entries := map[string]*pkgEntry{}
	var total int64
	uploaded := 0
	if size > 0 {
		if err := archive.Extract(ctx, src, size, root, archive.WithLimits(b.limits)); err != nil {
			return nil, archiveErr(err)
		}
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(root, p)
			if rel == "." {
				return nil
			}
			rel = filepath.ToSlash(rel)
			info, err := d.Info()
			if err != nil {
				return err
			}
			switch {
			case d.IsDir():
				entries[rel] = &pkgEntry{kind: tar.TypeDir, mode: int64(info.Mode().Perm())}
			case d.Type()&fs.ModeSymlink != 0:
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				entries[rel] = &pkgEntry{kind: tar.TypeSymlink, mode: 0o777, target: target}
			case d.Type().IsRegular():
				digest, err := b.storeFile(ctx, p)
				if err != nil {
					return err
				}
				entries[rel] = &pkgEntry{kind: tar.TypeReg, mode: int64(info.Mode().Perm()), size: info.Size(), file: p, digest: digest}
				total += info.Size()
				uploaded++
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("store uploaded files: %w", err)
		}
	}
	for i, f := range matched {
		if _, ok := entries[f.GetPath()]; ok {
			continue // the archive's copy wins
		}
		ok, _, err := b.blobs.Stat(ctx, f.GetDigest())
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("%s (%s): blob %s is no longer in the blobstore: match again and send it: %w",
				indexed("header.matched", i), f.GetPath(), f.GetDigest(), ErrNotFound)
		}
		entries[f.GetPath()] = &pkgEntry{kind: tar.TypeReg, mode: int64(f.GetMode() & 0o777), size: f.GetSize(), digest: f.GetDigest()}
		total += f.GetSize()
	}
	if lim := b.limits.MaxBytes; lim > 0 && total > lim {
		return nil, fieldErr("archive", "refused: the package would hold %d bytes, more than %d", total, lim)
	}
	// Every parent must be a directory: a matched file under an uploaded
	// symbolic link or file would be refused when a cell unpacks it.
	for p := range entries {
		for dir := path.Dir(p); dir != "."; dir = path.Dir(dir) {
			e, ok := entries[dir]
			if !ok {
				entries[dir] = &pkgEntry{kind: tar.TypeDir, mode: 0o755}
				continue
			}
			if e.kind != tar.TypeDir {
				return nil, fieldErr("header.matched", "%q lies under %q, which is not a directory", p, dir)
			}
		}
	}
	pkg, err := os.CreateTemp(work, "package-")
	if err != nil {
		return nil, fmt.Errorf("create package: %w", err)
	}
	defer pkg.Close()
	if err := b.writePackage(ctx, pkg, entries); err != nil {
		return nil, err
	}
	if _, err := pkg.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("rewind package: %w", err)
	}
	digest, n, err := b.blobs.Put(ctx, pkg, "", b.max)
	if err != nil {
		return nil, fmt.Errorf("store package: %w", err)
	}
	files := 0
	for _, e := range entries {
		if e.kind == tar.TypeReg {
			files++
		}
	}
	return &basinv1.UploadBitsResponse{BitsDigest: digest, Size: n, Files: int32(files), FilesUploaded: int32(uploaded)}, nil
}

// storeFile stores a file as a blob unless the blobstore has it already.
func (b *bitsAssembler) storeFile(ctx context.Context, p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", p, err)
	}
	digest := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if ok, _, err := b.blobs.Stat(ctx, digest); err != nil || ok {
		return digest, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	if _, _, err := b.blobs.Put(ctx, f, digest, b.max); err != nil {
		return "", fmt.Errorf("store file blob: %w", err)
	}
	return digest, nil
}

func (b *bitsAssembler) writePackage(ctx context.Context, w io.Writer, entries map[string]*pkgEntry) error {
	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	slices.Sort(names)
	zw, err := gzip.NewWriterLevel(w, gzip.DefaultCompression)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	for _, p := range names {
		if err := ctx.Err(); err != nil {
			return err
		}
		e := entries[p]
		hdr := &tar.Header{Name: p, Typeflag: e.kind, Mode: e.mode, ModTime: packageMTime, Format: tar.FormatPAX}
		switch e.kind {
		case tar.TypeDir:
			hdr.Name += "/"
		case tar.TypeSymlink:
			hdr.Linkname = e.target
		case tar.TypeReg:
			hdr.Size = e.size
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("write package entry %s: %w", p, err)
		}
		if e.kind != tar.TypeReg {
			continue
		}
		if err := b.copyContent(ctx, tw, p, e); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write package: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("write package: %w", err)
	}
	return nil
}

func (b *bitsAssembler) copyContent(ctx context.Context, w io.Writer, p string, e *pkgEntry) error {
	var r io.ReadCloser
	if e.file != "" {
		f, err := os.Open(e.file)
		if err != nil {
			return err
		}
		r = f
	} else {
		blob, size, err := b.blobs.Open(ctx, e.digest)
		if err != nil {
			return fmt.Errorf("matched file %s: %w", p, err)
		}
		if size != e.size {
			blob.Close()
			return fieldErr("header.matched", "%s: declared %d bytes, blob %s has %d", p, e.size, e.digest, size)
		}
		r = blob
	}
	defer r.Close()
	n, err := io.Copy(w, io.LimitReader(r, e.size))
	if err == nil && n != e.size {
		err = fmt.Errorf("short read: %d of %d bytes", n, e.size)
	}
	if err != nil {
		return fmt.Errorf("package entry %s: %w", p, err)
	}
	return nil
}
