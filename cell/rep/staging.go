package rep

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/basinpaas/basin/archive"
	"github.com/basinpaas/basin/cell/executor"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/basinpaas/basin/stack"
)

// Paths of the staging contract with basin-builder, inside the container.
const (
	builderPath         = "/tmp/lifecycle/basin-builder"
	stagingAppDir       = "/tmp/app"
	stagingBuildpackDir = "/tmp/buildpacks"
	stagingCacheDir     = "/tmp/cache"
	stagingOutputDir    = "/tmp/droplet"
)

// Builder exit codes (Cloud Foundry's) and the phase each one names.
var stagingPhases = map[uint32]string{222: "detect", 223: "compile", 224: "release", 225: "supply", 226: "finalize"}

// Bounds of what a staging reports back: the BBS keeps a task's result
// under 10 KiB.
const (
	maxOutputTail   = 4 << 10
	maxResultJSON   = 64 << 10
	maxStagingLines = 40
)

// BlobUploader stores blobs in the BBS's blobstore; *bbs.Client does.
type BlobUploader interface {
	UploadBlob(ctx context.Context, r io.Reader, want string) (digest string, size int64, err error)
}

// stagingWork is a staging task's workspace on the cell: host directories
// bind-mounted into the container, removed when the task ends.
type stagingWork struct {
	dir    string // StagingDir/<container id>
	app    string
	cache  string
	output string
	stack  string
}

// builderResult is result.json, as basin-builder writes it.
type builderResult struct {
	DetectedBuildpack string            `json:"detected_buildpack"`
	BuildpackKey      string            `json:"buildpack_key"`
	StartCommand      string            `json:"start_command"`
	ProcessTypes      map[string]string `json:"process_types"`
}

// stagingError is a failure before or after the builder ran, with the
// phase it is reported under.
type stagingError struct {
	phase string
	err   error
}

func (e *stagingError) Error() string { return e.phase + ": " + e.err.Error() }
func (e *stagingError) Unwrap() error { return e.err }

// prepareStaging lays out a staging task's workspace: the bits unpacked
// into app/ (owned by vcap), each buildpack unpacked once per cell and
// mounted read-only, the app's build cache restored into cache/, an empty
// output directory, and the builder. It returns the container's mounts and
// arguments.
func (r *Rep) prepareStaging(ctx context.Context, t *task, st *basinv1.StagingSpec, stackName string) (*stagingWork, []executor.Mount, []string, error) {
	if r.cfg.BuilderPath == "" {
		return nil, nil, nil, &stagingError{"setup", errors.New("this cell has no basin-builder (cell -builder flag, BuilderPath)")}
	}
	if _, err := os.Stat(r.cfg.BuilderPath); err != nil {
		return nil, nil, nil, &stagingError{"setup", fmt.Errorf("basin-builder: %w", err)}
	}
	w := &stagingWork{dir: filepath.Join(r.cfg.StagingDir, taskInstanceGUID(t.guid)), stack: stackName}
	w.app, w.cache, w.output = filepath.Join(w.dir, "app"), filepath.Join(w.dir, "cache"), filepath.Join(w.dir, "droplet")
	fail := func(phase string, err error) (*stagingWork, []executor.Mount, []string, error) {
		os.RemoveAll(w.dir)
		return nil, nil, nil, &stagingError{phase, err}
	}
	if err := os.RemoveAll(w.dir); err != nil {
		return fail("setup", err)
	}
	if err := os.MkdirAll(w.dir, 0o700); err != nil {
		return fail("setup", err)
	}
	for _, d := range []string{w.app, w.cache, w.output} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fail("setup", err)
		}
		if err := os.Chown(d, stack.VcapUID, stack.VcapGID); err != nil {
			return fail("setup", fmt.Errorf("chown %s to vcap: %w", d, err))
		}
	}
	blobs := blobsOf(r.bbs)
	if blobs == nil {
		return fail("download", errors.New("this cell has no blobstore to fetch the bits from"))
	}
	if err := r.unpackBlob(ctx, blobs, st.GetBitsDigest(), w.dir, w.app, true); err != nil {
		return fail("download", fmt.Errorf("app bits %s: %w", st.GetBitsDigest(), err))
	}
	if d := st.GetBuildCacheDigest(); d != "" {
		if err := r.unpackBlob(ctx, blobs, d, w.dir, w.cache, true); err != nil {
			// A cache is an optimisation: stage without it.
			r.log.Warn("build cache not restored; staging without it", "task", t.guid, "digest", d, "err", err)
			if err := os.RemoveAll(w.cache); err == nil {
				os.Mkdir(w.cache, 0o755)
				os.Chown(w.cache, stack.VcapUID, stack.VcapGID)
			}
		}
	}
	mounts := []executor.Mount{
		{Source: r.cfg.BuilderPath, Destination: builderPath, ReadOnly: true},
		{Source: w.app, Destination: stagingAppDir},
		{Source: w.cache, Destination: stagingCacheDir},
		{Source: w.output, Destination: stagingOutputDir},
	}
	var keys []string
	for i, bp := range st.GetResolvedBuildpacks() {
		if strings.ContainsAny(bp.GetKey(), "/\x00") || bp.GetKey() == "" || bp.GetKey() == "." || bp.GetKey() == ".." {
			return fail("setup", fmt.Errorf("buildpack %d: bad key %q", i, bp.GetKey()))
		}
		p, err := r.buildpacks.get(ctx, bp.GetDigest())
		if err != nil {
			return fail("download", fmt.Errorf("buildpack %s: %w", bp.GetKey(), err))
		}
		mounts = append(mounts, executor.Mount{Source: p, Destination: stagingBuildpackDir + "/" + bp.GetKey(), ReadOnly: true})
		keys = append(keys, bp.GetKey())
	}
	args := []string{builderPath,
		"-buildDir=" + stagingAppDir,
		"-buildpacksDir=" + stagingBuildpackDir,
		"-buildpackOrder=" + strings.Join(keys, ","),
	}
	if st.GetSkipDetect() {
		args = append(args, "-skipDetect")
	}
	args = append(args,
		"-buildArtifactsCacheDir="+stagingCacheDir,
		"-outputDroplet="+stagingOutputDir+"/droplet.tgz",
		"-outputMetadata="+stagingOutputDir+"/result.json",
	)
	return w, mounts, args, nil
}

// unpackBlob downloads a blob (verified against its digest) into a
// temporary file under work and unpacks it into dir with every archive
// check, owned by vcap when vcap is set.
func (r *Rep) unpackBlob(ctx context.Context, blobs Blobs, digest, work, dir string, vcap bool) error {
	f, size, err := downloadBlob(ctx, blobs, digest, work, r.cfg.MaxDropletBytes)
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	var opts []archive.Option
	if vcap {
		opts = append(opts, archive.WithOwner(stack.VcapUID, stack.VcapGID))
	}
	return archive.Extract(ctx, f, size, dir, opts...)
}

// downloadBlob fetches a blob into a new file in dir, checking its digest
// and size; the caller removes the file.
func downloadBlob(ctx context.Context, blobs Blobs, digest, dir string, max int64) (*os.File, int64, error) {
	f, err := os.CreateTemp(dir, ".blob-*")
	if err != nil {
		return nil, 0, err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	h := sha256.New()
	n, err := blobs.DownloadBlob(ctx, digest, &limitWriter{w: io.MultiWriter(f, h), left: max})
	if err != nil {
		return nil, 0, err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return nil, 0, fmt.Errorf("downloaded %s, want %s", got, digest)
	}
	ok = true
	return f, n, nil
}

type limitWriter struct {
	w    io.Writer
	left int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.left {
		return 0, fmt.Errorf("blob larger than the %d bytes allowed", l.left)
	}
	l.left -= int64(len(p))
	return l.w.Write(p)
}

// finishStaging turns the builder's exit into the task's outcome: on
// success the droplet and the build cache are uploaded and the result is a
// StagingResult with the droplet's digest; on failure it names the phase,
// the exit code and the output's tail.
func (r *Rep) finishStaging(ctx context.Context, t *task, x *executor.ExitInfo, timedOut bool, req *basinv1.CompleteTaskRequest) {
	w := t.staging
	defer os.RemoveAll(w.dir)
	res := &basinv1.StagingResult{Stack: w.stack}
	failWith := func(phase string, code uint32, reason string) {
		res.FailedPhase, res.ExitCode = phase, int32(code)
		res.OutputTail = r.stagingTail(t.instance)
		req.Failed, req.FailureReason = true, truncate(reason)
	}
	switch {
	case timedOut:
		failWith("timeout", x.Status, "staging timed out")
	case x.Stopped:
		failWith("stopped", x.Status, "staging stopped: the cell is evacuating or shutting down")
	case x.OOM:
		failWith("staging", x.Status, "staging failed: "+x.Reason)
	case x.Status != 0:
		phase, ok := stagingPhases[x.Status]
		if !ok {
			failWith("staging", x.Status, fmt.Sprintf("staging failed: basin-builder exited with status %d", x.Status))
			break
		}
		reason := fmt.Sprintf("staging failed in the %s phase (exit status %d)", phase, x.Status)
		if phase == "detect" {
			reason = fmt.Sprintf("staging failed: no buildpack detected the app (detect phase, exit status %d)", x.Status)
		}
		failWith(phase, x.Status, reason)
	default:
		if err := r.collectStaging(ctx, w, res); err != nil {
			var se *stagingError
			phase := "upload"
			if errors.As(err, &se) {
				phase = se.phase
			}
			failWith(phase, 0, "staging failed: "+err.Error())
		}
	}
	b, err := protojson.Marshal(res)
	if err == nil && len(b) <= maxReasonBytes {
		req.Result = string(b)
	} else if !req.Failed {
		req.Failed, req.FailureReason = true, fmt.Sprintf("staging result is larger than %d bytes", maxReasonBytes)
	}
}

// collectStaging reads result.json and droplet.tgz from the output
// directory (written by untrusted code: opened through an os.Root, regular
// files only) and uploads the droplet and the build cache.
func (r *Rep) collectStaging(ctx context.Context, w *stagingWork, res *basinv1.StagingResult) error {
	up, ok := r.bbs.(BlobUploader)
	if !ok {
		return &stagingError{"upload", errors.New("this cell has no blobstore to upload the droplet to")}
	}
	root, err := os.OpenRoot(w.output)
	if err != nil {
		return &stagingError{"release", err}
	}
	defer root.Close()
	raw, err := readRegular(root, "result.json", maxResultJSON)
	if err != nil {
		return &stagingError{"release", fmt.Errorf("basin-builder's result.json: %w", err)}
	}
	var br builderResult
	if err := json.Unmarshal(raw, &br); err != nil {
		return &stagingError{"release", fmt.Errorf("basin-builder's result.json: %w", err)}
	}
	res.DetectedBuildpack, res.BuildpackKey, res.StartCommand, res.ProcessTypes = br.DetectedBuildpack, br.BuildpackKey, br.StartCommand, br.ProcessTypes
	f, err := openRegular(root, "droplet.tgz")
	if err != nil {
		return &stagingError{"release", fmt.Errorf("basin-builder's droplet: %w", err)}
	}
	defer f.Close()
	d, _, err := up.UploadBlob(ctx, io.LimitReader(f, r.cfg.MaxDropletBytes), "")
	if err != nil {
		return &stagingError{"upload", fmt.Errorf("upload droplet: %w", err)}
	}
	res.DropletDigest = d
	if cache, err := r.uploadCache(ctx, up, w); err != nil {
		r.log.Warn("build cache not saved", "app_dir", w.dir, "err", err)
	} else {
		res.BuildCacheDigest = cache
	}
	return nil
}

// openRegular opens name under root only when it is a regular file (not a
// fifo, device or directory; a symbolic link may not leave the root).
func openRegular(root *os.Root, name string) (*os.File, error) {
	fi, err := root.Lstat(name)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (%v)", name, fi.Mode().Type())
	}
	return root.Open(name)
}

func readRegular(root *os.Root, name string, max int64) ([]byte, error) {
	f, err := openRegular(root, name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", name, max)
	}
	return b, nil
}

// uploadCache stores the cache directory as a tar.gz: directories, regular
// files and symbolic links as they are (never followed), the rest skipped.
func (r *Rep) uploadCache(ctx context.Context, up BlobUploader, w *stagingWork) (string, error) {
	tmp, err := os.CreateTemp(w.dir, ".cache-*.tgz")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	root, err := os.OpenRoot(w.cache)
	if err != nil {
		return "", err
	}
	defer root.Close()
	zw := gzip.NewWriter(tmp)
	tw := tar.NewWriter(zw)
	var total int64
	err = fs.WalkDir(root.FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == "." {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := root.Lstat(p)
		if err != nil {
			return err
		}
		hdr := &tar.Header{Name: p, Mode: int64(fi.Mode().Perm()), ModTime: fi.ModTime()}
		switch {
		case fi.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, p+"/"
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := root.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		case fi.Mode().IsRegular():
			hdr.Typeflag, hdr.Size = tar.TypeReg, fi.Size()
			total += fi.Size()
			if total > r.cfg.MaxDropletBytes {
				return fmt.Errorf("build cache is larger than %d bytes", r.cfg.MaxDropletBytes)
			}
		default:
			return nil
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := root.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.CopyN(tw, f, fi.Size())
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if err == nil {
		err = zw.Close()
	}
	if err != nil {
		return "", fmt.Errorf("pack build cache: %w", err)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	d, _, err := up.UploadBlob(ctx, tmp, "")
	return d, err
}

// stagingTail is the end of a staging's output, at most maxOutputTail bytes.
func (r *Rep) stagingTail(instance string) string {
	if instance == "" {
		return ""
	}
	buf, err := r.exec.Logs(instance)
	if err != nil {
		return ""
	}
	var lines []string
	for _, l := range buf.Recent(maxStagingLines) {
		if l.Source == executor.SourceStaging {
			lines = append(lines, l.Text)
		}
	}
	s := strings.Join(lines, "\n")
	if len(s) > maxOutputTail {
		s = s[len(s)-maxOutputTail:]
	}
	return s
}

// buildpackCache keeps buildpacks unpacked on the cell, one directory per
// archive digest, fetched and unpacked once however many stagings use them.
type buildpackCache struct {
	dir   string
	blobs Blobs
	max   int64

	fetching fetchGroup
}

func newBuildpackCache(dir string, blobs Blobs, max int64) *buildpackCache {
	return &buildpackCache{dir: dir, blobs: blobs, max: max}
}

// get returns the buildpack's root directory: the unpacked archive, or its
// only top-level directory when it has nothing else (GitHub's zips).
func (c *buildpackCache) get(ctx context.Context, digest string) (string, error) {
	hexSum, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || len(hexSum) != 64 {
		return "", fmt.Errorf("digest %q is not sha256:<64 hex>", digest)
	}
	if _, err := hex.DecodeString(hexSum); err != nil {
		return "", fmt.Errorf("digest %q is not sha256:<64 hex>", digest)
	}
	final := filepath.Join(c.dir, "sha256-"+hexSum)
	if _, err := os.Stat(final); err == nil {
		return buildpackRoot(final)
	}
	p, err := c.fetching.do(ctx, digest, func(ctx context.Context) (string, error) { return c.fetch(ctx, digest, final) })
	if err != nil {
		if ctx.Err() != nil {
			return "", fmt.Errorf("wait for buildpack %s: %w", digest, err)
		}
		return "", err
	}
	return buildpackRoot(p)
}

func (c *buildpackCache) fetch(ctx context.Context, digest, final string) (string, error) {
	if c.blobs == nil {
		return "", errors.New("this cell has no blobstore to fetch buildpacks from")
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return "", err
	}
	f, size, err := downloadBlob(ctx, c.blobs, digest, c.dir, c.max)
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	tmp, err := os.MkdirTemp(c.dir, ".unpack-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp) // a no-op once renamed
	if err := archive.Extract(ctx, f, size, tmp); err != nil {
		return "", fmt.Errorf("unpack: %w", err)
	}
	// Read-only for everyone else, readable and (where it was) executable
	// by vcap, whatever the archive's modes.
	err = filepath.WalkDir(tmp, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink != 0 {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		m := fi.Mode().Perm()
		if d.IsDir() || m&0o111 != 0 {
			m |= 0o555
		}
		return os.Chmod(p, (m|0o444)&^0o022)
	})
	if err != nil {
		return "", fmt.Errorf("set buildpack modes: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return "", err
	}
	return final, nil
}

// buildpackRoot is dir, or its only directory when that holds the
// buildpack (GitHub's zips wrap everything in NAME-BRANCH/).
func buildpackRoot(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	// A buildpack whose only entry is bin/ is already its root.
	if len(entries) == 1 && entries[0].IsDir() && entries[0].Name() != "bin" {
		return filepath.Join(dir, entries[0].Name()), nil
	}
	return dir, nil
}
