package bbs

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"testing"
	"time"

	"github.com/basinpaas/basin/bbs/blobstore"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestBlobstoreOverGRPC(t *testing.T) {
	blobs, err := blobstore.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	_, cli := startServer(t, Config{Blobs: blobs, MaxBlobBytes: 4 << 20})
	ctx := context.Background()
	content := make([]byte, 1<<20+12345) // several chunks, not a multiple of one
	rand.Read(content)
	sum := sha256.Sum256(content)
	want := "sha256:" + hex.EncodeToString(sum[:])

	d, n, err := cli.UploadBlob(ctx, bytes.NewReader(content), want)
	if err != nil || d != want || n != int64(len(content)) {
		t.Fatalf("upload: %s %d %v", d, n, err)
	}
	var got bytes.Buffer
	if n, err := cli.DownloadBlob(ctx, want, &got); err != nil || n != int64(len(content)) || !bytes.Equal(got.Bytes(), content) {
		t.Fatalf("download: %d bytes, equal=%v, %v", n, bytes.Equal(got.Bytes(), content), err)
	}
	other := "sha256:" + hex.EncodeToString(make([]byte, 32))
	st, err := cli.Blobs.StatBlobs(ctx, &basinv1.StatBlobsRequest{Digests: []string{want, other}})
	if err != nil || len(st.GetPresent()) != 1 || st.GetPresent()[0] != want {
		t.Fatalf("stat: %v %v", st, err)
	}

	tests := []struct {
		name    string
		content []byte
		digest  string
		code    codes.Code
	}{
		{"wrong digest", []byte("hello"), other, codes.InvalidArgument},
		{"malformed digest", []byte("hello"), "sha256:xyz", codes.InvalidArgument},
		{"too large", make([]byte, 5<<20), "", codes.ResourceExhausted},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := cli.UploadBlob(ctx, bytes.NewReader(tc.content), tc.digest); status.Code(err) != tc.code {
				t.Fatalf("upload: %v, want %v", err, tc.code)
			}
		})
	}
	if _, err := cli.DownloadBlob(ctx, other, &got); status.Code(err) != codes.NotFound {
		t.Fatalf("download of a missing blob: %v", err)
	}
	list, _ := blobs.List(ctx)
	if len(list) != 1 {
		t.Errorf("refused uploads left blobs behind: %v", list)
	}
}

func TestBlobGarbageCollection(t *testing.T) {
	s := startStore(t, StoreConfig{})
	blobs, err := blobstore.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	put := func(s string) string {
		d, _, err := blobs.Put(ctx, bytes.NewReader([]byte(s)), "", 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	used, bits, unused := put("droplet in use"), put("bits being staged"), put("old droplet")
	run := testRun()
	run.Droplet = &basinv1.DropletRef{Digest: used}
	if _, err := s.DesireLRP(ctx, testSchedule("gc", 1), run); err != nil {
		t.Fatal(err)
	}
	def := &basinv1.TaskDefinition{Stack: "tiny", Resources: &basinv1.ResourceLimits{MemoryMb: 1, DiskMb: 1, Pids: 1},
		Staging: &basinv1.StagingSpec{AppGuid: "gc", BitsDigest: bits}}
	if _, err := s.DesireTask(ctx, "stage-gc", "", def); err != nil {
		t.Fatal(err)
	}
	log := s.log
	// Within the grace period nothing goes: a fresh upload may be about to
	// be referenced.
	if n, err := collectBlobs(ctx, s, blobs, time.Hour, time.Now(), log); err != nil || n != 0 {
		t.Fatalf("collect within grace: %d %v", n, err)
	}
	n, err := collectBlobs(ctx, s, blobs, time.Hour, time.Now().Add(2*time.Hour), log)
	if err != nil || n != 1 {
		t.Fatalf("collect: deleted %d, %v; want 1", n, err)
	}
	for d, want := range map[string]bool{used: true, bits: true, unused: false} {
		if ok, _, _ := blobs.Stat(ctx, d); ok != want {
			t.Errorf("blob %s present=%v, want %v", d, ok, want)
		}
	}
}
