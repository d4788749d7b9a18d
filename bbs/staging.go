package bbs

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/basinpaas/basin/archive"
	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/protobuf/proto"
)

// Staging defaults: Cloud Foundry's staging container gets 1 GiB of memory
// and 4 GiB of disk, and 15 minutes.
const (
	StagingDomain          = "staging"
	DefaultStagingMemoryMB = 1024
	DefaultStagingDiskMB   = 4096
	DefaultStagingPids     = 1024
	DefaultStagingTimeout  = 15 * 60 * 1000 // ms
	maxStagingTimeout      = 2 * 60 * 60 * 1000
)

// StagingConfig configures the StagingService.
type StagingConfig struct {
	// TempDir holds uploads while they are checked and assembled; the
	// system's temporary directory when empty.
	TempDir string
	// MaxUploadBytes bounds the archive of one UploadBits.
	MaxUploadBytes int64
	// Bits bounds what an uploaded archive may unpack to.
	Bits archive.Limits
}

// StagingAPI serves the StagingService: resource match, bits upload, admin
// buildpacks and StageApp over the store and the blobstore.
type StagingAPI struct {
	basinv1.UnimplementedStagingServiceServer
	store  *Store
	blobs  blobstore.Store
	limits Limits
	cfg    StagingConfig
	bits   *bitsAssembler
	log    *slog.Logger
}

var _ basinv1.StagingServiceServer = (*StagingAPI)(nil)

// NewStagingAPI serves staging over store and blobs.
func NewStagingAPI(store *Store, blobs blobstore.Store, limits Limits, cfg StagingConfig, log *slog.Logger) *StagingAPI {
	if cfg.TempDir == "" {
		cfg.TempDir = os.TempDir()
	}
	if cfg.MaxUploadBytes <= 0 {
		cfg.MaxUploadBytes = 1 << 30
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &StagingAPI{store: store, blobs: blobs, limits: limits.withDefaults(), cfg: cfg, log: log,
		bits: &bitsAssembler{blobs: blobs, tmp: cfg.TempDir, limits: cfg.Bits, max: 4 << 30}}
}

func (a *StagingAPI) MatchResources(ctx context.Context, req *basinv1.MatchResourcesRequest) (*basinv1.MatchResourcesResponse, error) {
	if len(req.GetFiles()) > maxResourceFiles {
		return nil, fieldErr("files", "must name at most %d files, got %d", maxResourceFiles, len(req.GetFiles()))
	}
	present := map[string]bool{}
	resp := &basinv1.MatchResourcesResponse{}
	for i, f := range req.GetFiles() {
		if err := checkResourceFile(indexed("files", i), f); err != nil {
			return nil, err
		}
		ok, seen := present[f.GetDigest()]
		if !seen {
			var err error
			if ok, _, err = a.blobs.Stat(ctx, f.GetDigest()); err != nil {
				return nil, err
			}
			present[f.GetDigest()] = ok
		}
		if ok {
			resp.Matched = append(resp.Matched, f)
		}
	}
	return resp, nil
}

func (a *StagingAPI) UploadBits(stream basinv1.StagingService_UploadBitsServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("receive bits header: %w", err)
	}
	h := first.GetHeader()
	if h == nil {
		return fieldErr("header", "is required as the first message")
	}
	if err := checkGUID("header.app_guid", h.GetAppGuid()); err != nil {
		return err
	}
	switch h.GetFormat() {
	case "", "zip", "tgz", "tar":
	default:
		return fieldErr("header.format", "must be \"zip\", \"tgz\" or empty, got %q", h.GetFormat())
	}
	if len(h.GetMatched()) > maxResourceFiles {
		return fieldErr("header.matched", "must name at most %d files, got %d", maxResourceFiles, len(h.GetMatched()))
	}
	for i, f := range h.GetMatched() {
		if err := checkResourceFile(indexed("header.matched", i), f); err != nil {
			return err
		}
	}
	spool, err := os.CreateTemp(a.cfg.TempDir, "bits-upload-")
	if err != nil {
		return fmt.Errorf("spool bits: %w", err)
	}
	defer os.Remove(spool.Name())
	defer spool.Close()
	n, err := io.Copy(spool, io.LimitReader(chunksOf(stream.Recv, func(m *basinv1.UploadBitsRequest) bool { return m.GetHeader() != nil }), a.cfg.MaxUploadBytes+1))
	if err != nil {
		return fmt.Errorf("receive bits: %w", err)
	}
	if n > a.cfg.MaxUploadBytes {
		return fmt.Errorf("bits archive: %w: more than %d bytes", blobstore.ErrTooLarge, a.cfg.MaxUploadBytes)
	}
	resp, err := a.bits.assemble(ctx, spool, n, h.GetMatched())
	if err != nil {
		return err
	}
	a.log.Info("bits uploaded", "app", h.GetAppGuid(), "digest", resp.GetBitsDigest(), "files", resp.GetFiles(), "uploaded", resp.GetFilesUploaded())
	return stream.SendAndClose(resp)
}

// blobExists says, as a NotFound naming field, when digest is not stored.
func (a *StagingAPI) blobExists(ctx context.Context, field, digest string) error {
	if err := blobstore.CheckDigest(digest); err != nil {
		return fieldErr(field, "%v", err)
	}
	ok, _, err := a.blobs.Stat(ctx, digest)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s: %s is not in the blobstore: %w", field, digest, ErrNotFound)
	}
	return nil
}

// resolveBuildpacks turns what the user named (admin names or digests of
// uploaded archives) into what the cell mounts; with none named, every
// enabled admin buildpack for the stack, in position order, to detect over.
func (a *StagingAPI) resolveBuildpacks(ctx context.Context, named []string, stack string) ([]*basinv1.StagingBuildpack, error) {
	if len(named) > 16 {
		return nil, fieldErr("buildpacks", "must name at most 16 buildpacks, got %d", len(named))
	}
	admin, err := a.store.ListBuildpacks(ctx)
	if err != nil {
		return nil, err
	}
	var out []*basinv1.StagingBuildpack
	if len(named) == 0 {
		for _, b := range admin {
			if b.GetEnabled() && (b.GetStack() == "" || b.GetStack() == stack) {
				out = append(out, &basinv1.StagingBuildpack{Key: b.GetName(), Digest: b.GetDigest(), Name: b.GetName()})
			}
		}
		if len(out) == 0 {
			return nil, fieldErr("buildpacks", "none named and no admin buildpack is enabled for stack %q: name one (an admin buildpack or an uploaded archive's digest)", stack)
		}
		return out, nil
	}
	seen := map[string]bool{}
	for i, n := range named {
		field := indexed("buildpacks", i)
		var bp *basinv1.StagingBuildpack
		if strings.HasPrefix(n, "sha256:") {
			if err := a.blobExists(ctx, field, n); err != nil {
				return nil, err
			}
			bp = &basinv1.StagingBuildpack{Key: "sha256_" + strings.TrimPrefix(n, "sha256:"), Digest: n}
		} else {
			if err := checkBuildpackName(field, n); err != nil {
				return nil, err
			}
			b := findBuildpack(admin, n)
			if b == nil {
				return nil, fmt.Errorf("%s: no admin buildpack is named %q: %w", field, n, ErrNotFound)
			}
			if b.GetStack() != "" && b.GetStack() != stack {
				return nil, fieldErr(field, "buildpack %q is for stack %q, not %q", n, b.GetStack(), stack)
			}
			bp = &basinv1.StagingBuildpack{Key: b.GetName(), Digest: b.GetDigest(), Name: b.GetName()}
		}
		if seen[bp.GetKey()] {
			return nil, fieldErr(field, "%q is named twice", n)
		}
		seen[bp.GetKey()] = true
		out = append(out, bp)
	}
	return out, nil
}

func (a *StagingAPI) StageApp(ctx context.Context, req *basinv1.StageAppRequest) (*basinv1.StageAppResponse, error) {
	if err := checkGUID("app_guid", req.GetAppGuid()); err != nil {
		return nil, err
	}
	if err := a.blobExists(ctx, "bits_digest", req.GetBitsDigest()); err != nil {
		return nil, err
	}
	if err := checkStack("stack", req.GetStack()); err != nil {
		return nil, err
	}
	if err := a.limits.checkEnv("env", req.GetEnv()); err != nil {
		return nil, err
	}
	res := &basinv1.ResourceLimits{MemoryMb: DefaultStagingMemoryMB, DiskMb: DefaultStagingDiskMB, Pids: DefaultStagingPids}
	if r := req.GetResources(); r != nil {
		res = proto.Clone(r).(*basinv1.ResourceLimits)
		if res.MemoryMb == 0 {
			res.MemoryMb = DefaultStagingMemoryMB
		}
		if res.DiskMb == 0 {
			res.DiskMb = DefaultStagingDiskMB
		}
		if res.Pids == 0 {
			res.Pids = DefaultStagingPids
		}
	}
	if err := a.limits.checkResources("resources", res); err != nil {
		return nil, err
	}
	timeout := req.GetTimeoutMs()
	if timeout < 0 || timeout > maxStagingTimeout {
		return nil, fieldErr("timeout_ms", "must be between 0 and %d, got %d", maxStagingTimeout, timeout)
	}
	if timeout == 0 {
		timeout = DefaultStagingTimeout
	}
	bps, err := a.resolveBuildpacks(ctx, req.GetBuildpacks(), req.GetStack())
	if err != nil {
		return nil, err
	}
	cache, err := a.store.BuildCache(ctx, req.GetAppGuid())
	if err != nil {
		return nil, err
	}
	if cache != "" {
		if ok, _, err := a.blobs.Stat(ctx, cache); err != nil || !ok {
			cache = "" // collected or unreadable: stage without it
		}
	}
	def := &basinv1.TaskDefinition{
		Stack: req.GetStack(), Env: req.GetEnv(), Resources: res, TimeoutMs: timeout,
		Staging: &basinv1.StagingSpec{
			AppGuid: req.GetAppGuid(), BitsDigest: req.GetBitsDigest(), Buildpacks: req.GetBuildpacks(),
			ResolvedBuildpacks: bps, SkipDetect: len(req.GetBuildpacks()) > 0, BuildCacheDigest: cache,
		},
	}
	if err := a.limits.checkTaskDefinition("definition", def); err != nil {
		return nil, err
	}
	guid := "staging-" + randomHex(16)
	if _, err := a.store.DesireTask(ctx, guid, StagingDomain, def); err != nil {
		return nil, err
	}
	a.log.Info("staging task desired", "app", req.GetAppGuid(), "task", guid, "buildpacks", len(bps), "cache", cache != "")
	return &basinv1.StageAppResponse{TaskGuid: guid}, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (a *StagingAPI) ListBuildpacks(ctx context.Context, _ *basinv1.ListBuildpacksRequest) (*basinv1.ListBuildpacksResponse, error) {
	bps, err := a.store.ListBuildpacks(ctx)
	if err != nil {
		return nil, err
	}
	return &basinv1.ListBuildpacksResponse{Buildpacks: bps}, nil
}

func checkFilename(field, f string) error {
	if len(f) > 255 || strings.ContainsAny(f, "/\x00") {
		return fieldErr(field, "must be a file name of at most 255 bytes without '/', got %q", f)
	}
	return nil
}

func (a *StagingAPI) CreateBuildpack(ctx context.Context, req *basinv1.CreateBuildpackRequest) (*basinv1.CreateBuildpackResponse, error) {
	bp := req.GetBuildpack()
	if bp == nil {
		return nil, fieldErr("buildpack", "is required")
	}
	if err := checkBuildpackName("buildpack.name", bp.GetName()); err != nil {
		return nil, err
	}
	if bp.GetPosition() < 0 {
		return nil, fieldErr("buildpack.position", "must be 0 (last) or a 1-based position, got %d", bp.GetPosition())
	}
	if bp.GetStack() != "" {
		if err := checkStack("buildpack.stack", bp.GetStack()); err != nil {
			return nil, err
		}
	}
	if err := checkFilename("buildpack.filename", bp.GetFilename()); err != nil {
		return nil, err
	}
	if err := a.blobExists(ctx, "buildpack.digest", bp.GetDigest()); err != nil {
		return nil, err
	}
	in := &basinv1.Buildpack{Name: bp.GetName(), Position: bp.GetPosition(), Enabled: bp.GetEnabled(), Digest: bp.GetDigest(),
		Stack: bp.GetStack(), Filename: bp.GetFilename()}
	out, err := a.store.CreateBuildpack(ctx, in)
	if err != nil {
		return nil, err
	}
	return &basinv1.CreateBuildpackResponse{Buildpack: out}, nil
}

func (a *StagingAPI) UpdateBuildpack(ctx context.Context, req *basinv1.UpdateBuildpackRequest) (*basinv1.UpdateBuildpackResponse, error) {
	if err := checkBuildpackName("name", req.GetName()); err != nil {
		return nil, err
	}
	u := BuildpackUpdate{Position: req.Position, Enabled: req.Enabled, Digest: req.Digest, Filename: req.Filename}
	if u.Position != nil && *u.Position < 0 {
		return nil, fieldErr("position", "must be 0 (last) or a 1-based position, got %d", *u.Position)
	}
	if u.Digest != nil {
		if err := a.blobExists(ctx, "digest", *u.Digest); err != nil {
			return nil, err
		}
	}
	if u.Filename != nil {
		if err := checkFilename("filename", *u.Filename); err != nil {
			return nil, err
		}
	}
	out, err := a.store.UpdateBuildpack(ctx, req.GetName(), u)
	if err != nil {
		return nil, err
	}
	return &basinv1.UpdateBuildpackResponse{Buildpack: out}, nil
}

func (a *StagingAPI) DeleteBuildpack(ctx context.Context, req *basinv1.DeleteBuildpackRequest) (*basinv1.DeleteBuildpackResponse, error) {
	if err := checkBuildpackName("name", req.GetName()); err != nil {
		return nil, err
	}
	return &basinv1.DeleteBuildpackResponse{}, a.store.DeleteBuildpack(ctx, req.GetName())
}

// RegisterBuiltin stores each built-in buildpack's archive in the blobstore
// and creates its admin record when missing (at the end, in the given
// order) or points it at the new archive when its digest changed, keeping
// any position and enabled flag an admin set. Safe to run from several BBS
// replicas at once. Names must pass the admin buildpack name rules.
func (a *StagingAPI) RegisterBuiltin(ctx context.Context, archives []BuildpackArchive) error {
	digests := make([]string, len(archives))
	for i, ar := range archives {
		if err := checkBuildpackName(fmt.Sprintf("builtin[%d].name", i), ar.Name); err != nil {
			return err
		}
		d, _, err := a.blobs.Put(ctx, bytes.NewReader(ar.Data), "", int64(len(ar.Data)))
		if err != nil {
			return fmt.Errorf("store built-in buildpack %s: %w", ar.Name, err)
		}
		digests[i] = d
	}
	if err := a.store.registerBuiltin(ctx, archives, digests); err != nil {
		return fmt.Errorf("register built-in buildpacks: %w", err)
	}
	return nil
}
