package bbs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/protobuf/encoding/protojson"
)

const blobChunk = 256 << 10

// BlobAPI serves the BlobstoreService over a blobstore.Store.
type BlobAPI struct {
	basinv1.UnimplementedBlobstoreServiceServer
	store blobstore.Store
	limit int64
}

var _ basinv1.BlobstoreServiceServer = (*BlobAPI)(nil)

// NewBlobAPI serves store, refusing blobs larger than limit bytes.
func NewBlobAPI(store blobstore.Store, limit int64) *BlobAPI {
	return &BlobAPI{store: store, limit: limit}
}

// chunkReader turns a client stream of one header, then chunks, into an
// io.Reader of the chunks; a second header is refused.
type chunkReader struct {
	recv func() (chunk []byte, header bool, err error)
	buf  []byte
}

// chunksOf reads the chunks of stream, whose first message was the header.
func chunksOf[M interface{ GetChunk() []byte }](recv func() (M, error), isHeader func(M) bool) *chunkReader {
	return &chunkReader{recv: func() ([]byte, bool, error) {
		m, err := recv()
		if err != nil {
			return nil, false, err
		}
		return m.GetChunk(), isHeader(m), nil
	}}
}

func (u *chunkReader) Read(p []byte) (int, error) {
	for len(u.buf) == 0 {
		chunk, header, err := u.recv()
		if err != nil {
			return 0, err // io.EOF ends the upload
		}
		if header {
			return 0, fieldErr("header", "must come first and only once")
		}
		u.buf = chunk
	}
	n := copy(p, u.buf)
	u.buf = u.buf[n:]
	return n, nil
}

func (a *BlobAPI) UploadBlob(stream basinv1.BlobstoreService_UploadBlobServer) error {
	first, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("receive upload header: %w", err)
	}
	h := first.GetHeader()
	if h == nil {
		return fieldErr("header", "is required as the first message")
	}
	if h.GetDigest() != "" {
		if err := blobstore.CheckDigest(h.GetDigest()); err != nil {
			return fieldErr("header.digest", "%v", err)
		}
	}
	if h.GetSize() < 0 || h.GetSize() > a.limit {
		return fieldErr("header.size", "must be between 0 and %d bytes, got %d", a.limit, h.GetSize())
	}
	digest, size, err := a.store.Put(stream.Context(), chunksOf(stream.Recv, func(m *basinv1.UploadBlobRequest) bool { return m.GetHeader() != nil }), h.GetDigest(), a.limit)
	if err != nil {
		return err
	}
	if h.GetSize() != 0 && size != h.GetSize() {
		// The content is stored (it is content-addressed and whole), but
		// the client's declaration was wrong: tell it.
		return fieldErr("header.size", "declared %d bytes, received %d", h.GetSize(), size)
	}
	return stream.SendAndClose(&basinv1.UploadBlobResponse{Digest: digest, Size: size})
}

func (a *BlobAPI) DownloadBlob(req *basinv1.DownloadBlobRequest, stream basinv1.BlobstoreService_DownloadBlobServer) error {
	if err := blobstore.CheckDigest(req.GetDigest()); err != nil {
		return fieldErr("digest", "%v", err)
	}
	r, size, err := a.store.Open(stream.Context(), req.GetDigest())
	if err != nil {
		return err
	}
	defer r.Close()
	buf := make([]byte, blobChunk)
	first := true
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 || first {
			msg := &basinv1.DownloadBlobResponse{Chunk: buf[:n]}
			if first {
				msg.Size, first = size, false
			}
			if serr := stream.Send(msg); serr != nil {
				return serr
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read blob %s: %w", req.GetDigest(), err)
		}
	}
}

func (a *BlobAPI) StatBlobs(ctx context.Context, req *basinv1.StatBlobsRequest) (*basinv1.StatBlobsResponse, error) {
	if len(req.GetDigests()) > 10000 {
		return nil, fieldErr("digests", "must name at most 10000 digests, got %d", len(req.GetDigests()))
	}
	resp := &basinv1.StatBlobsResponse{}
	for i, d := range req.GetDigests() {
		if err := blobstore.CheckDigest(d); err != nil {
			return nil, fieldErr(indexed("digests", i), "%v", err)
		}
		ok, _, err := a.store.Stat(ctx, d)
		if err != nil {
			return nil, err
		}
		if ok {
			resp.Present = append(resp.Present, d)
		}
	}
	return resp, nil
}

// referencedBlobs is every digest something in etcd points at: droplets of
// desired LRPs and tasks, the bits, buildpacks and build cache of staging
// tasks and the droplet a completed one produced, admin buildpacks' archives
// and apps' build caches.
func referencedBlobs(ctx context.Context, store *Store) (map[string]bool, error) {
	referenced := map[string]bool{}
	lrps, err := store.ListDesiredLRPs(ctx, "")
	if err != nil {
		return nil, err
	}
	for _, d := range lrps {
		referenced[d.GetRun().GetDroplet().GetDigest()] = true
	}
	tasks, err := store.ListTasks(ctx, "", "")
	if err != nil {
		return nil, err
	}
	for _, t := range tasks {
		referenced[t.GetDefinition().GetDroplet().GetDigest()] = true
		st := t.GetDefinition().GetStaging()
		if st == nil {
			continue
		}
		referenced[st.GetBitsDigest()] = true
		referenced[st.GetBuildCacheDigest()] = true
		for _, b := range st.GetResolvedBuildpacks() {
			referenced[b.GetDigest()] = true
		}
		var res basinv1.StagingResult
		if t.GetResult() != "" && protojson.Unmarshal([]byte(t.GetResult()), &res) == nil {
			referenced[res.GetDropletDigest()] = true
			referenced[res.GetBuildCacheDigest()] = true
		}
	}
	bps, err := store.ListBuildpacks(ctx)
	if err != nil {
		return nil, err
	}
	for _, b := range bps {
		referenced[b.GetDigest()] = true
	}
	caches, err := store.listBuildCaches(ctx)
	if err != nil {
		return nil, err
	}
	for _, d := range caches {
		referenced[d] = true
	}
	delete(referenced, "")
	return referenced, nil
}

// collectBlobs deletes blobs that nothing in etcd references and that are
// older than grace, so an upload about to be referenced (a package before
// its StageApp, a droplet before its DesireLRP, the files of a push that a
// later push matches) is kept.
func collectBlobs(ctx context.Context, store *Store, blobs blobstore.Store, grace time.Duration, now time.Time, log *slog.Logger) (int, error) {
	referenced, err := referencedBlobs(ctx, store)
	if err != nil {
		return 0, err
	}
	all, err := blobs.List(ctx)
	if err != nil {
		return 0, err
	}
	deleted := 0
	for _, d := range all {
		if referenced[d] {
			continue
		}
		ok, stored, err := blobs.Stat(ctx, d)
		if err != nil || !ok || now.Sub(stored) < grace {
			continue
		}
		if err := blobs.Delete(ctx, d); err != nil {
			return deleted, err
		}
		log.Info("deleted unreferenced blob", "digest", d, "stored", stored)
		deleted++
	}
	return deleted, nil
}
