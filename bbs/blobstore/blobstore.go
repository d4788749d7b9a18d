// Package blobstore keeps content-addressed blobs: droplets, app bits and
// buildpacks, named by the sha256 of their content.
package blobstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Errors of a Store.
var (
	ErrNotFound       = errors.New("blob not found")
	ErrDigestMismatch = errors.New("blob digest mismatch")
	ErrTooLarge       = errors.New("blob too large")
	ErrBadDigest      = errors.New(`digest must be "sha256:" and 64 lower-case hex digits`)
)

// Store keeps blobs by digest ("sha256:<hex>").
type Store interface {
	// Put stores what r yields, at most limit bytes. When want is not empty
	// the content must hash to it (ErrDigestMismatch); nothing is stored on
	// error.
	Put(ctx context.Context, r io.Reader, want string, limit int64) (digest string, size int64, err error)
	// Open returns the blob and its size, or ErrNotFound.
	Open(ctx context.Context, digest string) (io.ReadCloser, int64, error)
	// Stat reports whether the blob exists and when it was stored.
	Stat(ctx context.Context, digest string) (exists bool, stored time.Time, err error)
	// List returns every digest.
	List(ctx context.Context) ([]string, error)
	// Delete removes a blob; a missing one is not an error.
	Delete(ctx context.Context, digest string) error
}

var digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

// CheckDigest validates the form of a digest.
func CheckDigest(d string) error {
	if !digestRE.MatchString(d) {
		return fmt.Errorf("%q: %w", d, ErrBadDigest)
	}
	return nil
}

// Local keeps blobs as files under a directory. Writes go to a temporary
// file that is synced and renamed into place, so a blob is either whole or
// absent, even across a crash.
type Local struct {
	dir string
}

var _ Store = (*Local)(nil)

// NewLocal uses dir (created when missing).
func NewLocal(dir string) (*Local, error) {
	for _, d := range []string{filepath.Join(dir, "sha256"), filepath.Join(dir, "tmp")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create blobstore dir %s: %w", d, err)
		}
	}
	// Leftovers of uploads interrupted by a crash.
	tmps, _ := os.ReadDir(filepath.Join(dir, "tmp"))
	for _, t := range tmps {
		os.Remove(filepath.Join(dir, "tmp", t.Name()))
	}
	return &Local{dir: dir}, nil
}

func (l *Local) path(digest string) string {
	return filepath.Join(l.dir, "sha256", strings.TrimPrefix(digest, "sha256:"))
}

// Put implements Store.
func (l *Local) Put(ctx context.Context, r io.Reader, want string, limit int64) (string, int64, error) {
	if want != "" {
		if err := CheckDigest(want); err != nil {
			return "", 0, err
		}
	}
	tmp, digest, n, err := spool(ctx, r, filepath.Join(l.dir, "tmp"), want, limit)
	if err != nil {
		return "", 0, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := tmp.Sync(); err != nil {
		return "", 0, fmt.Errorf("sync blob: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", 0, fmt.Errorf("close blob: %w", err)
	}
	if err := os.Rename(tmp.Name(), l.path(digest)); err != nil {
		return "", 0, fmt.Errorf("store blob %s: %w", digest, err)
	}
	return digest, n, nil
}

// Open implements Store.
func (l *Local) Open(_ context.Context, digest string) (io.ReadCloser, int64, error) {
	if err := CheckDigest(digest); err != nil {
		return nil, 0, err
	}
	f, err := os.Open(l.path(digest))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fmt.Errorf("%s: %w", digest, ErrNotFound)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("open blob %s: %w", digest, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("stat blob %s: %w", digest, err)
	}
	return f, st.Size(), nil
}

// Stat implements Store.
func (l *Local) Stat(_ context.Context, digest string) (bool, time.Time, error) {
	if err := CheckDigest(digest); err != nil {
		return false, time.Time{}, err
	}
	st, err := os.Stat(l.path(digest))
	if errors.Is(err, fs.ErrNotExist) {
		return false, time.Time{}, nil
	}
	if err != nil {
		return false, time.Time{}, fmt.Errorf("stat blob %s: %w", digest, err)
	}
	return true, st.ModTime(), nil
}

// List implements Store.
func (l *Local) List(context.Context) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(l.dir, "sha256"))
	if err != nil {
		return nil, fmt.Errorf("list blobs: %w", err)
	}
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		if d := "sha256:" + e.Name(); digestRE.MatchString(d) {
			out = append(out, d)
		}
	}
	return out, nil
}

// Delete implements Store.
func (l *Local) Delete(_ context.Context, digest string) error {
	if err := CheckDigest(digest); err != nil {
		return err
	}
	if err := os.Remove(l.path(digest)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete blob %s: %w", digest, err)
	}
	return nil
}

func sum(h hash.Hash) string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }

// spool copies at most limit bytes of r into a new file in dir, hashing as it
// goes, and checks the digest against want when given. On success the caller
// owns the file (and removes it); on error nothing is left behind.
func spool(ctx context.Context, r io.Reader, dir, want string, limit int64) (_ *os.File, digest string, n int64, err error) {
	tmp, err := os.CreateTemp(dir, "upload-")
	if err != nil {
		return nil, "", 0, fmt.Errorf("create upload file: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	n, err = io.Copy(io.MultiWriter(tmp, h), &ctxReader{ctx: ctx, r: io.LimitReader(r, limit+1)})
	if err != nil {
		return nil, "", 0, fmt.Errorf("receive blob: %w", err)
	}
	if n > limit {
		return nil, "", 0, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, limit)
	}
	digest = sum(h)
	if want != "" && want != digest {
		return nil, "", 0, fmt.Errorf("%w: sent %s, content is %s", ErrDigestMismatch, want, digest)
	}
	return tmp, digest, n, nil
}

// ctxReader stops a copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
