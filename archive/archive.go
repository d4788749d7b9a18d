// Package archive unpacks tar, tar.gz and zip archives that come from users
// (app bits, droplets) without letting any entry escape or damage the
// directory it is unpacked into.
//
// Every entry must name a relative path with no ".." component; no entry may
// be written through a symbolic link (even one pointing inside the root);
// symbolic links may only point inside the root; device files, fifos and
// sockets are refused; the total unpacked size, the number of entries and the
// ratio of unpacked to compressed bytes are bounded. All file system
// operations go through an os.Root, so even a bug in these checks cannot write
// outside the destination.
package archive

import (
	"archive/tar"
	"archive/zip"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
)

// Errors returned (wrapped, naming the entry) when an archive is refused.
var (
	// ErrUnsafePath: an absolute path, a ".." component, a write through a
	// symbolic link or a link that points outside the root.
	ErrUnsafePath = errors.New("unsafe path")
	// ErrForbiddenType: device files, fifos, sockets and unknown entry types.
	ErrForbiddenType = errors.New("forbidden entry type")
	// ErrLimit: the archive exceeds a size, entry count or decompression
	// ratio limit.
	ErrLimit = errors.New("archive limit exceeded")
	// ErrFormat: the input is not an archive of a supported format.
	ErrFormat = errors.New("unsupported archive format")
)

// Limits bound what one archive may unpack to. Zero fields take the defaults.
type Limits struct {
	// MaxBytes bounds the sum of all regular files' sizes.
	MaxBytes int64
	// MaxEntries bounds the number of entries of any type.
	MaxEntries int
	// MaxRatio bounds unpacked bytes per compressed byte for compressed
	// formats; small archives get a fixed allowance (ratioSlack) on top so
	// tiny, highly compressible inputs are not refused.
	MaxRatio int64
}

// Defaults: generous for app bits and droplets (Cloud Foundry allows 1 GiB
// droplets), small enough that a bomb cannot fill a cell's disk.
const (
	DefaultMaxBytes   = 2 << 30
	DefaultMaxEntries = 200_000
	DefaultMaxRatio   = 200
	ratioSlack        = 1 << 20
)

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxRatio <= 0 {
		l.MaxRatio = DefaultMaxRatio
	}
	return l
}

// Option configures an extraction.
type Option func(*options)

type options struct {
	limits Limits
	chown  bool
	uid    int
	gid    int
}

// WithLimits overrides the default limits.
func WithLimits(l Limits) Option { return func(o *options) { o.limits = l } }

// WithOwner makes every created file, directory and link owned by uid:gid
// whatever the archive says; droplets are unpacked this way so the app's user
// owns its files. Without it, entries belong to the calling process.
func WithOwner(uid, gid int) Option {
	return func(o *options) { o.chown, o.uid, o.gid = true, uid, gid }
}

// Extract detects the format of r (gzip-compressed tar, plain tar or zip) and
// unpacks it into dir, which must exist.
func Extract(ctx context.Context, r io.ReaderAt, size int64, dir string, opts ...Option) error {
	head := make([]byte, 512)
	n, err := r.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read archive header: %w", err)
	}
	head = head[:n]
	sr := io.NewSectionReader(r, 0, size)
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		return ExtractTarGz(ctx, sr, dir, opts...)
	case bytes.HasPrefix(head, []byte("PK\x03\x04")), bytes.HasPrefix(head, []byte("PK\x05\x06")):
		return ExtractZip(ctx, r, size, dir, opts...)
	case len(head) >= 262 && string(head[257:262]) == "ustar":
		return ExtractTar(ctx, sr, dir, opts...)
	}
	return fmt.Errorf("extract into %s: %w: neither gzip, tar nor zip", dir, ErrFormat)
}

// ExtractTarGz unpacks a gzip-compressed tar stream into dir.
func ExtractTarGz(ctx context.Context, r io.Reader, dir string, opts ...Option) error {
	cr := &countingReader{r: r}
	zr, err := gzip.NewReader(bufio.NewReader(cr))
	if err != nil {
		return fmt.Errorf("extract into %s: %w: gzip: %w", dir, ErrFormat, err)
	}
	defer zr.Close()
	return extractTar(ctx, zr, cr, dir, opts)
}

// ExtractTar unpacks an uncompressed tar stream into dir. The ratio limit
// does not apply; the size and entry limits do.
func ExtractTar(ctx context.Context, r io.Reader, dir string, opts ...Option) error {
	return extractTar(ctx, r, nil, dir, opts)
}

func extractTar(ctx context.Context, r io.Reader, compressed *countingReader, dir string, opts []Option) error {
	x, err := newExtractor(dir, compressed, opts)
	if err != nil {
		return err
	}
	defer x.root.Close()
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("extract into %s: %w", dir, err)
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("extract into %s: %w: tar: %w", dir, ErrFormat, err)
		}
		var e entry
		e.name, e.mode = hdr.Name, hdr.FileInfo().Mode().Perm()
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA: //nolint:staticcheck // old archives still use TypeRegA
			e.kind, e.size, e.body = kindFile, hdr.Size, tr
		case tar.TypeDir:
			e.kind = kindDir
		case tar.TypeSymlink:
			e.kind, e.target = kindSymlink, hdr.Linkname
		case tar.TypeLink:
			e.kind, e.target = kindHardlink, hdr.Linkname
		case tar.TypeXGlobalHeader:
			continue
		default:
			return fmt.Errorf("archive entry %q: %w: tar type %q", hdr.Name, ErrForbiddenType, hdr.Typeflag)
		}
		if err := x.add(e); err != nil {
			return err
		}
	}
}

// ExtractZip unpacks a zip archive of the given size into dir.
func ExtractZip(ctx context.Context, r io.ReaderAt, size int64, dir string, opts ...Option) error {
	zr, err := zip.NewReader(r, size)
	if err != nil {
		return fmt.Errorf("extract into %s: %w: zip: %w", dir, ErrFormat, err)
	}
	// The whole compressed input counts toward the ratio from the start:
	// zip's central directory tells us its size up front.
	x, err := newExtractor(dir, &countingReader{n: size}, opts)
	if err != nil {
		return err
	}
	defer x.root.Close()
	for _, f := range zr.File {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("extract into %s: %w", dir, err)
		}
		mode := f.Mode()
		e := entry{name: f.Name, mode: mode.Perm()}
		switch {
		case mode.IsDir():
			e.kind = kindDir
		case mode&fs.ModeSymlink != 0:
			target, err := readZipLink(f)
			if err != nil {
				return err
			}
			e.kind, e.target = kindSymlink, target
		case mode.IsRegular():
			rc, err := f.Open()
			if err != nil {
				return fmt.Errorf("archive entry %q: open: %w", f.Name, err)
			}
			// The header's size may lie; the copy is bounded by it and by
			// the remaining budget, and a short body is an error.
			e.kind, e.size, e.body = kindFile, int64(f.UncompressedSize64), rc
			err = x.add(e)
			rc.Close()
			if err != nil {
				return err
			}
			continue
		default:
			return fmt.Errorf("archive entry %q: %w: zip mode %v", f.Name, ErrForbiddenType, mode)
		}
		if err := x.add(e); err != nil {
			return err
		}
	}
	return nil
}

func readZipLink(f *zip.File) (string, error) {
	rc, err := f.Open()
	if err != nil {
		return "", fmt.Errorf("archive entry %q: open: %w", f.Name, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, 4097))
	if err != nil {
		return "", fmt.Errorf("archive entry %q: read link: %w", f.Name, err)
	}
	if len(b) > 4096 {
		return "", fmt.Errorf("archive entry %q: %w: link target longer than 4096 bytes", f.Name, ErrLimit)
	}
	return string(b), nil
}

type kind int

const (
	kindFile kind = iota
	kindDir
	kindSymlink
	kindHardlink
)

type entry struct {
	name   string
	kind   kind
	mode   fs.FileMode
	size   int64
	target string
	body   io.Reader
}

type extractor struct {
	dir        string
	root       *os.Root
	opts       options
	compressed *countingReader // nil for uncompressed input
	entries    int
	written    int64
}

func newExtractor(dir string, compressed *countingReader, opts []Option) (*extractor, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	o.limits = o.limits.withDefaults()
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("extract into %s: %w", dir, err)
	}
	return &extractor{dir: dir, root: root, opts: o, compressed: compressed}, nil
}

// clean validates an entry's name and returns it relative to the root, or ""
// for the root itself.
func clean(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("archive entry with an empty name: %w", ErrUnsafePath)
	}
	if strings.HasPrefix(name, "/") || strings.HasPrefix(name, `\`) {
		return "", fmt.Errorf("archive entry %q: %w: absolute path", name, ErrUnsafePath)
	}
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("archive entry %q: %w: NUL in name", name, ErrUnsafePath)
	}
	for _, c := range strings.FieldsFunc(name, func(r rune) bool { return r == '/' || r == '\\' }) {
		if c == ".." {
			return "", fmt.Errorf("archive entry %q: %w: \"..\" component", name, ErrUnsafePath)
		}
	}
	p := path.Clean(name)
	if p == "." {
		return "", nil
	}
	return p, nil
}

func (x *extractor) add(e entry) error {
	x.entries++
	if x.entries > x.opts.limits.MaxEntries {
		return fmt.Errorf("archive entry %q: %w: more than %d entries", e.name, ErrLimit, x.opts.limits.MaxEntries)
	}
	name, err := clean(e.name)
	if err != nil {
		return err
	}
	if name == "" {
		// The root itself ("./"): it already exists; leave its mode alone.
		return nil
	}
	if err := x.ensureParents(e.name, name); err != nil {
		return err
	}
	switch e.kind {
	case kindDir:
		return x.mkdir(e, name)
	case kindFile:
		return x.writeFile(e, name)
	case kindSymlink:
		return x.symlink(e, name)
	case kindHardlink:
		return x.hardlink(e, name)
	}
	return fmt.Errorf("archive entry %q: %w", e.name, ErrForbiddenType)
}

// ensureParents creates missing parent directories and refuses any parent
// that is a symbolic link: writing through a link, even one that points
// inside the root, would let a later entry land somewhere the archive's
// listing does not show.
func (x *extractor) ensureParents(orig, name string) error {
	dir := path.Dir(name)
	if dir == "." {
		return nil
	}
	p := ""
	for _, c := range strings.Split(dir, "/") {
		p = path.Join(p, c)
		fi, err := x.root.Lstat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if err := x.root.Mkdir(p, 0o755); err != nil {
				return fmt.Errorf("archive entry %q: create parent %s: %w", orig, p, err)
			}
			if err := x.chown(p); err != nil {
				return fmt.Errorf("archive entry %q: %w", orig, err)
			}
		case err != nil:
			return fmt.Errorf("archive entry %q: inspect parent %s: %w", orig, p, err)
		case fi.Mode()&fs.ModeSymlink != 0:
			return fmt.Errorf("archive entry %q: %w: parent %s is a symbolic link", orig, ErrUnsafePath, p)
		case !fi.IsDir():
			return fmt.Errorf("archive entry %q: %w: parent %s is not a directory", orig, ErrUnsafePath, p)
		}
	}
	return nil
}

func (x *extractor) chown(name string) error {
	if !x.opts.chown {
		return nil
	}
	if err := x.root.Lchown(name, x.opts.uid, x.opts.gid); err != nil {
		return fmt.Errorf("chown %s: %w", name, err)
	}
	return nil
}

func (x *extractor) mkdir(e entry, name string) error {
	fi, err := x.root.Lstat(name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := x.root.Mkdir(name, 0o755); err != nil {
			return fmt.Errorf("archive entry %q: mkdir: %w", e.name, err)
		}
	case err != nil:
		return fmt.Errorf("archive entry %q: %w", e.name, err)
	case !fi.IsDir():
		return fmt.Errorf("archive entry %q: %w: exists and is not a directory", e.name, ErrUnsafePath)
	}
	// Keep directories traversable by their owner whatever the archive says.
	if err := x.root.Chmod(name, e.mode|0o700); err != nil {
		return fmt.Errorf("archive entry %q: chmod: %w", e.name, err)
	}
	if err := x.chown(name); err != nil {
		return fmt.Errorf("archive entry %q: %w", e.name, err)
	}
	return nil
}

// replaceable removes a non-directory already at name (tar lets later entries
// override earlier ones) so the new entry is created fresh, never opened
// through an existing link.
func (x *extractor) replaceable(e entry, name string) error {
	fi, err := x.root.Lstat(name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("archive entry %q: %w", e.name, err)
	case fi.IsDir():
		return fmt.Errorf("archive entry %q: %w: a directory exists there", e.name, ErrUnsafePath)
	}
	if err := x.root.Remove(name); err != nil {
		return fmt.Errorf("archive entry %q: replace: %w", e.name, err)
	}
	return nil
}

func (x *extractor) writeFile(e entry, name string) error {
	lim := x.opts.limits
	if e.size < 0 || e.size > lim.MaxBytes-x.written {
		return fmt.Errorf("archive entry %q: %w: unpacked size would exceed %d bytes", e.name, ErrLimit, lim.MaxBytes)
	}
	if err := x.replaceable(e, name); err != nil {
		return err
	}
	// O_EXCL: never follow a link planted at the final component.
	f, err := x.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("archive entry %q: create: %w", e.name, err)
	}
	n, err := io.Copy(&ratioWriter{w: f, x: x, name: e.name}, io.LimitReader(e.body, e.size))
	if err == nil && n != e.size {
		err = fmt.Errorf("%w: body has %d of %d bytes", ErrFormat, n, e.size)
	}
	if err == nil {
		// Setuid/setgid bits are dropped: an app's files never need them.
		err = f.Chmod(e.mode & 0o777)
	}
	if err == nil && x.opts.chown {
		err = f.Chown(x.opts.uid, x.opts.gid)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("archive entry %q: write: %w", e.name, err)
	}
	return nil
}

// insideRoot reports whether target, resolved lexically from the directory
// holding the link at name, stays inside the root.
func insideRoot(name, target string) bool {
	if target == "" || path.IsAbs(target) {
		return false
	}
	p := path.Join(path.Dir(name), target)
	return p != ".." && !strings.HasPrefix(p, "../")
}

func (x *extractor) symlink(e entry, name string) error {
	if !insideRoot(name, e.target) {
		return fmt.Errorf("archive entry %q: %w: symbolic link to %q points outside the root", e.name, ErrUnsafePath, e.target)
	}
	if err := x.replaceable(e, name); err != nil {
		return err
	}
	if err := x.root.Symlink(e.target, name); err != nil {
		return fmt.Errorf("archive entry %q: symlink: %w", e.name, err)
	}
	if err := x.chown(name); err != nil {
		return fmt.Errorf("archive entry %q: %w", e.name, err)
	}
	return nil
}

func (x *extractor) hardlink(e entry, name string) error {
	target, err := clean(e.target)
	if err != nil || target == "" {
		return fmt.Errorf("archive entry %q: %w: hard link to %q", e.name, ErrUnsafePath, e.target)
	}
	if err := x.ensureParents(e.name, target); err != nil {
		return err
	}
	fi, err := x.root.Lstat(target)
	if err != nil {
		return fmt.Errorf("archive entry %q: hard link target %q: %w", e.name, e.target, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("archive entry %q: %w: hard link target %q is not a regular file", e.name, ErrUnsafePath, e.target)
	}
	if err := x.replaceable(e, name); err != nil {
		return err
	}
	if err := x.root.Link(target, name); err != nil {
		return fmt.Errorf("archive entry %q: hard link: %w", e.name, err)
	}
	return nil
}

// ratioWriter counts unpacked bytes and stops the copy as soon as the total
// or the decompression ratio is exceeded, before the disk fills.
type ratioWriter struct {
	w    io.Writer
	x    *extractor
	name string
}

func (w *ratioWriter) Write(p []byte) (int, error) {
	x := w.x
	x.written += int64(len(p))
	lim := x.opts.limits
	if x.written > lim.MaxBytes {
		return 0, fmt.Errorf("%w: unpacked size exceeds %d bytes", ErrLimit, lim.MaxBytes)
	}
	if x.compressed != nil && x.written > x.compressed.n*lim.MaxRatio+ratioSlack {
		return 0, fmt.Errorf("%w: %d bytes unpacked from %d compressed exceeds ratio %d (decompression bomb?)",
			ErrLimit, x.written, x.compressed.n, lim.MaxRatio)
	}
	return w.w.Write(p)
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
