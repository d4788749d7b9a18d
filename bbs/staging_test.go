package bbs

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"io/fs"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
)

func startStagingServer(t *testing.T) (*Server, *Client, *blobstore.Local) {
	t.Helper()
	blobs, err := blobstore.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	srv, cli := startServer(t, Config{Blobs: blobs, Staging: StagingConfig{TempDir: t.TempDir()}})
	return srv, cli, blobs
}

type tarEnt struct {
	name   string
	typ    byte
	body   string
	link   string
	mode   int64
	size   int64 // overrides len(body) when set
	stream io.Reader
}

func tgzOf(t *testing.T, ents ...tarEnt) []byte {
	t.Helper()
	var raw bytes.Buffer
	zw := gzip.NewWriter(&raw)
	tw := tar.NewWriter(zw)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: e.mode}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
			if e.size > 0 {
				h.Size = e.size
			}
		}
		if e.typ == tar.TypeChar {
			h.Devmajor, h.Devminor = 1, 3
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.stream != nil {
			if _, err := io.Copy(tw, e.stream); err != nil {
				t.Fatal(err)
			}
		} else if e.typ == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	zw.Close()
	return raw.Bytes()
}

type zipEnt struct {
	name string
	body string
	mode uint32 // fs mode bits incl. symlink
}

func zipOf(t *testing.T, ents ...zipEnt) []byte {
	t.Helper()
	var raw bytes.Buffer
	zw := zip.NewWriter(&raw)
	for _, e := range ents {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		if e.mode != 0 {
			h.SetMode(fsMode(e.mode))
		}
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(e.body))
	}
	zw.Close()
	return raw.Bytes()
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func resourceFiles(files map[string]string) []*basinv1.ResourceFile {
	var out []*basinv1.ResourceFile
	for p, body := range files {
		out = append(out, &basinv1.ResourceFile{Path: p, Digest: digestOf([]byte(body)), Size: int64(len(body)), Mode: 0o644})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// readPackage lists a package's entries as "path mode [content|-> target]".
func readPackage(t *testing.T, blobs blobstore.Store, digest string) []string {
	t.Helper()
	r, _, err := blobs.Open(context.Background(), digest)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	zr, err := gzip.NewReader(r)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var out []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		line := h.Name + " " + strconvOctal(h.Mode)
		switch h.Typeflag {
		case tar.TypeReg:
			line += " " + string(b)
		case tar.TypeSymlink:
			line += " -> " + h.Linkname
		}
		if !h.ModTime.Equal(packageMTime) {
			t.Errorf("%s: mtime %v, want the fixed %v", h.Name, h.ModTime, packageMTime)
		}
		out = append(out, line)
	}
}

func strconvOctal(m int64) string { return "0" + strings.TrimLeft(octal(m), "0") }

func octal(m int64) string {
	const digits = "01234567"
	s := ""
	for m > 0 {
		s = string(digits[m%8]) + s
		m /= 8
	}
	if s == "" {
		return "0"
	}
	return s
}

// TestUploadBitsMatchesResources: the first push sends everything; its
// files become blobs, so a second push of the same files matches all of
// them, sends no archive and gets the same package digest. A zip of the
// same files assembles to the same package too.
func TestUploadBitsMatchesResources(t *testing.T) {
	_, cli, blobs := startStagingServer(t)
	ctx := context.Background()
	files := map[string]string{"index.html": "hello\n", "lib/app.rb": "puts 1\n", "bin/run": "#!/bin/sh\n"}
	first := tgzOf(t,
		tarEnt{name: "index.html", typ: tar.TypeReg, body: files["index.html"]},
		tarEnt{name: "lib/", typ: tar.TypeDir, mode: 0o755},
		tarEnt{name: "lib/app.rb", typ: tar.TypeReg, body: files["lib/app.rb"]},
		tarEnt{name: "bin/run", typ: tar.TypeReg, body: files["bin/run"], mode: 0o755},
		tarEnt{name: "current", typ: tar.TypeSymlink, link: "lib"},
	)
	m, err := cli.Staging.MatchResources(ctx, &basinv1.MatchResourcesRequest{Files: resourceFiles(files)})
	if err != nil || len(m.GetMatched()) != 0 {
		t.Fatalf("match before any upload: %v %v", m, err)
	}
	r1, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Format: "tgz"}, bytes.NewReader(first))
	if err != nil {
		t.Fatal(err)
	}
	if r1.GetFiles() != 3 || r1.GetFilesUploaded() != 3 {
		t.Errorf("first upload: %v, want 3 files all uploaded", r1)
	}
	want := []string{"bin/ 0755", "bin/run 0755 #!/bin/sh\n", "current 0777 -> lib", "index.html 0644 hello\n", "lib/ 0755", "lib/app.rb 0644 puts 1\n"}
	if got := readPackage(t, blobs, r1.GetBitsDigest()); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("package:\n%q\nwant\n%q", got, want)
	}

	rf := resourceFiles(files)
	for _, f := range rf {
		if f.Path == "bin/run" {
			f.Mode = 0o755
		}
	}
	m, err = cli.Staging.MatchResources(ctx, &basinv1.MatchResourcesRequest{Files: rf})
	if err != nil || len(m.GetMatched()) != 3 {
		t.Fatalf("match after the upload: %v %v", m, err)
	}
	// The symlink is not a resource: it comes in the archive.
	rest := tgzOf(t, tarEnt{name: "current", typ: tar.TypeSymlink, link: "lib"})
	r2, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Format: "tgz", Matched: m.GetMatched()}, bytes.NewReader(rest))
	if err != nil {
		t.Fatal(err)
	}
	if r2.GetBitsDigest() != r1.GetBitsDigest() || r2.GetFilesUploaded() != 0 || r2.GetFiles() != 3 {
		t.Errorf("second upload %v: want digest %s with nothing uploaded", r2, r1.GetBitsDigest())
	}

	// Nothing but matched files, no archive at all.
	r3, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Matched: resourceFiles(map[string]string{"index.html": "hello\n"})}, nil)
	if err != nil || r3.GetFiles() != 1 || r3.GetFilesUploaded() != 0 {
		t.Fatalf("matched-only upload: %v %v", r3, err)
	}

	z := zipOf(t,
		zipEnt{name: "index.html", body: files["index.html"], mode: 0o644},
		zipEnt{name: "lib/app.rb", body: files["lib/app.rb"], mode: 0o644},
		zipEnt{name: "bin/run", body: files["bin/run"], mode: 0o755},
		zipEnt{name: "current", body: "lib", mode: 0o777 | symlinkBit},
	)
	r4, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Format: "zip"}, bytes.NewReader(z))
	if err != nil || r4.GetBitsDigest() != r1.GetBitsDigest() {
		t.Errorf("zip of the same files: %v %v, want digest %s", r4, err, r1.GetBitsDigest())
	}

	// A matched digest the blobstore lacks is NotFound, naming the entry.
	gone := resourceFiles(map[string]string{"x": "never uploaded"})
	_, err = cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Matched: gone}, nil)
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "header.matched[0]") {
		t.Errorf("missing matched blob: %v", err)
	}
}

// TestUploadBitsRefusesBadArchives: every escape and the bomb are refused
// with INVALID_ARGUMENT naming the problem, and nothing is stored.
func TestUploadBitsRefusesBadArchives(t *testing.T) {
	_, cli, blobs := startStagingServer(t)
	ctx := context.Background()
	zeros := tgzOf(t, tarEnt{name: "big", typ: tar.TypeReg, size: 64 << 20, stream: io.LimitReader(zeroReader{}, 64<<20)})
	tests := []struct {
		name, format string
		data         []byte
		want         string
	}{
		{"tar dotdot", "tgz", tgzOf(t, tarEnt{name: "../evil", typ: tar.TypeReg, body: "x"}), `".." component`},
		{"tar absolute", "tgz", tgzOf(t, tarEnt{name: "/etc/evil", typ: tar.TypeReg, body: "x"}), "absolute path"},
		{"tar symlink escape", "tgz", tgzOf(t, tarEnt{name: "out", typ: tar.TypeSymlink, link: "../../etc"}), "points outside the root"},
		{"tar absolute symlink", "tgz", tgzOf(t, tarEnt{name: "out", typ: tar.TypeSymlink, link: "/etc/passwd"}), "points outside the root"},
		{"tar write through symlink", "tgz", tgzOf(t, tarEnt{name: "d", typ: tar.TypeSymlink, link: "."}, tarEnt{name: "d/x", typ: tar.TypeReg, body: "x"}), "is a symbolic link"},
		{"tar device", "tgz", tgzOf(t, tarEnt{name: "null", typ: tar.TypeChar}), "forbidden entry type"},
		{"tar bomb", "tgz", zeros, "decompression bomb"},
		{"zip dotdot", "zip", zipOf(t, zipEnt{name: "../evil", body: "x"}), `".." component`},
		{"zip absolute", "zip", zipOf(t, zipEnt{name: "/etc/evil", body: "x"}), "absolute path"},
		{"zip symlink escape", "zip", zipOf(t, zipEnt{name: "out", body: "../../etc", mode: 0o777 | symlinkBit}), "points outside the root"},
		{"not an archive", "zip", []byte("just some text, no archive at all"), "unsupported archive format"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Format: tc.format}, bytes.NewReader(tc.data))
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "archive") {
				t.Fatalf("got %v, want INVALID_ARGUMENT naming %q", err, tc.want)
			}
			t.Logf("%v", status.Convert(err).Message())
		})
	}
	if list, _ := blobs.List(ctx); len(list) != 0 {
		t.Errorf("refused uploads stored %d blobs", len(list))
	}
	for _, tc := range []struct {
		h    *basinv1.UploadBitsHeader
		want string
	}{
		{&basinv1.UploadBitsHeader{AppGuid: "a b"}, "header.app_guid"},
		{&basinv1.UploadBitsHeader{AppGuid: "a", Format: "rar"}, "header.format"},
		{&basinv1.UploadBitsHeader{AppGuid: "a", Matched: []*basinv1.ResourceFile{{Path: "../x", Digest: digestOf(nil)}}}, "header.matched[0].path"},
		{&basinv1.UploadBitsHeader{AppGuid: "a", Matched: []*basinv1.ResourceFile{{Path: "x", Digest: "md5:1"}}}, "header.matched[0].digest"},
	} {
		if _, err := cli.UploadBits(ctx, tc.h, nil); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("header %v: %v, want INVALID_ARGUMENT naming %s", tc.h, err, tc.want)
		}
	}
}

const symlinkBit = uint32(fs.ModeSymlink)

func fsMode(m uint32) fs.FileMode { return fs.FileMode(m) }

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func names(bps []*basinv1.Buildpack) string {
	var s []string
	for i, b := range bps {
		if b.GetPosition() != int32(i+1) {
			s = append(s, "!"+b.GetName())
			continue
		}
		s = append(s, b.GetName())
	}
	return strings.Join(s, ",")
}

// TestBuildpackOrdering: positions stay dense 1..n whatever is created,
// moved or deleted, as cf create-buildpack NAME PATH POSITION does.
func TestBuildpackOrdering(t *testing.T) {
	_, cli, _ := startStagingServer(t)
	ctx := context.Background()
	d, _, err := cli.UploadBlob(ctx, bytes.NewReader(tgzOf(t, tarEnt{name: "bin/detect", typ: tar.TypeReg, body: "exit 0"})), "")
	if err != nil {
		t.Fatal(err)
	}
	list := func() string {
		t.Helper()
		r, err := cli.Staging.ListBuildpacks(ctx, &basinv1.ListBuildpacksRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return names(r.GetBuildpacks())
	}
	create := func(name string, pos int32) error {
		_, err := cli.Staging.CreateBuildpack(ctx, &basinv1.CreateBuildpackRequest{Buildpack: &basinv1.Buildpack{Name: name, Position: pos, Digest: d, Enabled: true}})
		return err
	}
	move := func(name string, pos int32) error {
		_, err := cli.Staging.UpdateBuildpack(ctx, &basinv1.UpdateBuildpackRequest{Name: name, Position: &pos})
		return err
	}
	for _, n := range []string{"a", "b", "c"} {
		if err := create(n, 0); err != nil {
			t.Fatal(err)
		}
	}
	steps := []struct {
		do   func() error
		want string
	}{
		{func() error { return create("d", 1) }, "d,a,b,c"},
		{func() error { return create("e", 3) }, "d,a,e,b,c"},
		{func() error { return create("f", 99) }, "d,a,e,b,c,f"},
		{func() error { return move("c", 1) }, "c,d,a,e,b,f"},
		{func() error { return move("c", 6) }, "d,a,e,b,f,c"},
		{func() error { return move("d", 0) }, "a,e,b,f,c,d"},
		{func() error {
			_, err := cli.Staging.DeleteBuildpack(ctx, &basinv1.DeleteBuildpackRequest{Name: "e"})
			return err
		}, "a,b,f,c,d"},
	}
	for i, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if got := list(); got != s.want {
			t.Fatalf("step %d: order %s, want %s", i, got, s.want)
		}
	}
	errs := []struct {
		err  error
		code codes.Code
		want string
	}{
		{create("a", 0), codes.AlreadyExists, "a"},
		{move("zz", 1), codes.NotFound, "zz"},
		{func() error {
			_, err := cli.Staging.DeleteBuildpack(ctx, &basinv1.DeleteBuildpackRequest{Name: "zz"})
			return err
		}(), codes.NotFound, "zz"},
		{create("sha256_x", 0), codes.InvalidArgument, "buildpack.name"},
		{create("has/slash", 0), codes.InvalidArgument, "buildpack.name"},
		{func() error {
			_, err := cli.Staging.CreateBuildpack(ctx, &basinv1.CreateBuildpackRequest{Buildpack: &basinv1.Buildpack{Name: "g", Digest: digestOf([]byte("nope"))}})
			return err
		}(), codes.NotFound, "buildpack.digest"},
	}
	for i, e := range errs {
		if status.Code(e.err) != e.code || !strings.Contains(e.err.Error(), e.want) {
			t.Errorf("error %d: %v, want %v naming %s", i, e.err, e.code, e.want)
		}
	}
	if got := list(); got != "a,b,f,c,d" {
		t.Errorf("refused calls changed the order: %s", got)
	}
}

// TestRegisterBuiltin: built-ins are created in their order on a fresh
// platform; on the next start a changed archive updates the digest only,
// and an admin's reordering and disabling are kept.
func TestRegisterBuiltin(t *testing.T) {
	srv, cli, _ := startStagingServer(t)
	ctx := context.Background()
	v1 := []BuildpackArchive{{Name: "staticfile", Data: []byte("s1")}, {Name: "ruby", Data: []byte("r1")}, {Name: "go", Data: []byte("g1")}}
	if err := srv.Staging().RegisterBuiltin(ctx, v1); err != nil {
		t.Fatal(err)
	}
	r, _ := cli.Staging.ListBuildpacks(ctx, &basinv1.ListBuildpacksRequest{})
	if got := names(r.GetBuildpacks()); got != "staticfile,ruby,go" {
		t.Fatalf("first registration: %s", got)
	}
	pos, off := int32(1), false
	if _, err := cli.Staging.UpdateBuildpack(ctx, &basinv1.UpdateBuildpackRequest{Name: "go", Position: &pos, Enabled: &off}); err != nil {
		t.Fatal(err)
	}
	v2 := []BuildpackArchive{{Name: "staticfile", Data: []byte("s1")}, {Name: "ruby", Data: []byte("r2")}, {Name: "go", Data: []byte("g1")}, {Name: "php", Data: []byte("p1")}}
	if err := srv.Staging().RegisterBuiltin(ctx, v2); err != nil {
		t.Fatal(err)
	}
	r, _ = cli.Staging.ListBuildpacks(ctx, &basinv1.ListBuildpacksRequest{})
	if got := names(r.GetBuildpacks()); got != "go,staticfile,ruby,php" {
		t.Fatalf("after the admin's move and a new version: %s", got)
	}
	for _, b := range r.GetBuildpacks() {
		want := map[string]string{"go": "g1", "staticfile": "s1", "ruby": "r2", "php": "p1"}[b.GetName()]
		if b.GetDigest() != digestOf([]byte(want)) {
			t.Errorf("%s: digest %s, want that of %q", b.GetName(), b.GetDigest(), want)
		}
		if b.GetName() == "go" && b.GetEnabled() {
			t.Errorf("go was re-enabled")
		}
	}
}

// TestStageAppValidates: every field names itself, and a valid request
// desires a staging task with the resolved buildpacks and defaults.
func TestStageAppValidates(t *testing.T) {
	srv, cli, _ := startStagingServer(t)
	ctx := context.Background()
	bits, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Format: "tgz"},
		bytes.NewReader(tgzOf(t, tarEnt{name: "index.html", typ: tar.TypeReg, body: "hi"})))
	if err != nil {
		t.Fatal(err)
	}
	bp, _, err := cli.UploadBlob(ctx, strings.NewReader("a buildpack"), "")
	if err != nil {
		t.Fatal(err)
	}
	missing := digestOf([]byte("missing"))
	valid := func() *basinv1.StageAppRequest {
		return &basinv1.StageAppRequest{AppGuid: "app-1", BitsDigest: bits.GetBitsDigest(), Stack: "tiny"}
	}
	tests := []struct {
		name  string
		mut   func(*basinv1.StageAppRequest)
		code  codes.Code
		field string
	}{
		{"bad app guid", func(r *basinv1.StageAppRequest) { r.AppGuid = "a/b" }, codes.InvalidArgument, "app_guid"},
		{"no bits", func(r *basinv1.StageAppRequest) { r.BitsDigest = "" }, codes.InvalidArgument, "bits_digest"},
		{"bits not stored", func(r *basinv1.StageAppRequest) { r.BitsDigest = missing }, codes.NotFound, "bits_digest"},
		{"no stack", func(r *basinv1.StageAppRequest) { r.Stack = "" }, codes.InvalidArgument, "stack"},
		{"no admin buildpack", func(r *basinv1.StageAppRequest) {}, codes.InvalidArgument, "buildpacks"},
		{"unknown admin name", func(r *basinv1.StageAppRequest) { r.Buildpacks = []string{"ruby"} }, codes.NotFound, "buildpacks[0]"},
		{"digest not stored", func(r *basinv1.StageAppRequest) { r.Buildpacks = []string{bp, missing} }, codes.NotFound, "buildpacks[1]"},
		{"bad digest", func(r *basinv1.StageAppRequest) { r.Buildpacks = []string{"sha256:zz"} }, codes.InvalidArgument, "buildpacks[0]"},
		{"bad env", func(r *basinv1.StageAppRequest) { r.Env = []*basinv1.EnvVar{{Name: "1X"}} }, codes.InvalidArgument, "env[0].name"},
		{"too much memory", func(r *basinv1.StageAppRequest) { r.Resources = &basinv1.ResourceLimits{MemoryMb: 1 << 30} }, codes.InvalidArgument, "resources.memory_mb"},
		{"negative timeout", func(r *basinv1.StageAppRequest) { r.TimeoutMs = -1 }, codes.InvalidArgument, "timeout_ms"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := valid()
			tc.mut(req)
			_, err := cli.Staging.StageApp(ctx, req)
			if status.Code(err) != tc.code || !strings.HasPrefix(status.Convert(err).Message(), tc.field) {
				t.Fatalf("got %v, want %v naming %s", err, tc.code, tc.field)
			}
		})
	}

	if _, err := cli.Staging.CreateBuildpack(ctx, &basinv1.CreateBuildpackRequest{Buildpack: &basinv1.Buildpack{Name: "static", Digest: bp, Enabled: true}}); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Staging.CreateBuildpack(ctx, &basinv1.CreateBuildpackRequest{Buildpack: &basinv1.Buildpack{Name: "off", Digest: bp}}); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Staging.StageApp(ctx, valid())
	if err != nil {
		t.Fatal(err)
	}
	task, err := srv.Store().GetTask(ctx, resp.GetTaskGuid())
	if err != nil {
		t.Fatal(err)
	}
	def := task.GetDefinition()
	st := def.GetStaging()
	if task.GetDomain() != StagingDomain || def.GetResources().GetMemoryMb() != DefaultStagingMemoryMB || def.GetResources().GetDiskMb() != DefaultStagingDiskMB ||
		def.GetTimeoutMs() != DefaultStagingTimeout || st.GetSkipDetect() || len(st.GetResolvedBuildpacks()) != 1 ||
		st.GetResolvedBuildpacks()[0].GetKey() != "static" || st.GetResolvedBuildpacks()[0].GetDigest() != bp {
		t.Errorf("detecting staging task %v: want domain staging, the defaults and only the enabled admin buildpack", task)
	}

	req := valid()
	req.Buildpacks = []string{"off", bp}
	resp, err = cli.Staging.StageApp(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	task, _ = srv.Store().GetTask(ctx, resp.GetTaskGuid())
	st = task.GetDefinition().GetStaging()
	if !st.GetSkipDetect() || len(st.GetResolvedBuildpacks()) != 2 || st.GetResolvedBuildpacks()[0].GetKey() != "off" ||
		st.GetResolvedBuildpacks()[1].GetKey() != "sha256_"+strings.TrimPrefix(bp, "sha256:") {
		t.Errorf("named buildpacks %v: want off, then the archive keyed by its digest, detection skipped", st)
	}
}

// TestStagingCompletionSavesTheBuildCache: a successful staging's cache is
// what the app's next StageApp restores; a failed one changes nothing. The
// blob GC keeps the cache, the buildpacks and the droplet.
func TestStagingCompletionSavesTheBuildCache(t *testing.T) {
	srv, cli, blobs := startStagingServer(t)
	ctx := context.Background()
	store := srv.Store()
	bits, err := cli.UploadBits(ctx, &basinv1.UploadBitsHeader{AppGuid: "app-1", Format: "tgz"},
		bytes.NewReader(tgzOf(t, tarEnt{name: "index.html", typ: tar.TypeReg, body: "hi"})))
	if err != nil {
		t.Fatal(err)
	}
	bp, _, _ := cli.UploadBlob(ctx, strings.NewReader("a buildpack"), "")
	cache, _, _ := cli.UploadBlob(ctx, strings.NewReader("a cache"), "")
	droplet, _, _ := cli.UploadBlob(ctx, strings.NewReader("a droplet"), "")
	stray, _, _ := cli.UploadBlob(ctx, strings.NewReader("nobody's"), "")
	fence := registerCell(t, store, "cell-1")

	stage := func(fail bool) string {
		t.Helper()
		resp, err := cli.Staging.StageApp(ctx, &basinv1.StageAppRequest{AppGuid: "app-1", BitsDigest: bits.GetBitsDigest(), Stack: "tiny", Buildpacks: []string{bp}})
		if err != nil {
			t.Fatal(err)
		}
		g := resp.GetTaskGuid()
		if _, _, err := store.StartTask(ctx, g, "cell-1", fence); err != nil {
			t.Fatal(err)
		}
		res := &basinv1.StagingResult{DropletDigest: droplet, BuildCacheDigest: cache}
		if fail {
			res = &basinv1.StagingResult{FailedPhase: "compile", ExitCode: 223, BuildCacheDigest: cache}
		}
		b, _ := protojson.Marshal(res)
		if _, err := store.CompleteTask(ctx, g, "cell-1", fail, "", string(b), fence); err != nil {
			t.Fatal(err)
		}
		return g
	}
	stage(true)
	if d, _ := store.BuildCache(ctx, "app-1"); d != "" {
		t.Fatalf("a failed staging saved cache %s", d)
	}
	g := stage(false)
	if d, _ := store.BuildCache(ctx, "app-1"); d != cache {
		t.Fatalf("build cache %q, want %s", d, cache)
	}
	resp, err := cli.Staging.StageApp(ctx, &basinv1.StageAppRequest{AppGuid: "app-1", BitsDigest: bits.GetBitsDigest(), Stack: "tiny", Buildpacks: []string{bp}})
	if err != nil {
		t.Fatal(err)
	}
	next, _ := store.GetTask(ctx, resp.GetTaskGuid())
	if next.GetDefinition().GetStaging().GetBuildCacheDigest() != cache {
		t.Errorf("next staging restores %q, want %s", next.GetDefinition().GetStaging().GetBuildCacheDigest(), cache)
	}
	// Everything but the stray blob and the files is referenced.
	if err := store.ResolveTask(ctx, g, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := collectBlobs(ctx, store, blobs, 0, time.Now().Add(time.Hour), srv.log); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{bits.GetBitsDigest(), bp, cache} {
		if ok, _, _ := blobs.Stat(ctx, d); !ok {
			t.Errorf("GC collected %s, which is referenced", d)
		}
	}
	if ok, _, _ := blobs.Stat(ctx, stray); ok {
		t.Errorf("GC kept the unreferenced blob")
	}
}
