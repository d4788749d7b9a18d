package blobstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func TestLocalPut(t *testing.T) {
	content := []byte("a droplet")
	tests := []struct {
		name    string
		want    string
		limit   int64
		wantErr error
	}{
		{"no expected digest", "", 100, nil},
		{"expected digest", digestOf(content), 100, nil},
		{"wrong digest", digestOf([]byte("other")), 100, ErrDigestMismatch},
		{"malformed digest", "md5:abc", 100, ErrBadDigest},
		{"too large", "", 4, ErrTooLarge},
		{"exactly the limit", "", int64(len(content)), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := NewLocal(dir)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			d, n, err := s.Put(ctx, bytes.NewReader(content), tc.want, tc.limit)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Put: %v, want %v", err, tc.wantErr)
			}
			list, _ := s.List(ctx)
			tmps, _ := os.ReadDir(filepath.Join(dir, "tmp"))
			if len(tmps) != 0 {
				t.Errorf("%d temporary files left", len(tmps))
			}
			if tc.wantErr != nil {
				if len(list) != 0 {
					t.Errorf("a failed Put stored %v", list)
				}
				return
			}
			if d != digestOf(content) || n != int64(len(content)) {
				t.Fatalf("Put = %s %d", d, n)
			}
			r, size, err := s.Open(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(r)
			r.Close()
			if !bytes.Equal(got, content) || size != int64(len(content)) {
				t.Errorf("Open gave %q (%d)", got, size)
			}
			if ok, _, _ := s.Stat(ctx, d); !ok {
				t.Error("Stat says the blob is missing")
			}
			if err := s.Delete(ctx, d); err != nil {
				t.Fatal(err)
			}
			if _, _, err := s.Open(ctx, d); !errors.Is(err, ErrNotFound) {
				t.Errorf("Open after Delete: %v", err)
			}
		})
	}
}

func TestLocalRejectsPathsAsDigests(t *testing.T) {
	s, err := NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"sha256:../../etc/passwd", "sha256:" + strings.Repeat("A", 64), "../x"} {
		if _, _, err := s.Open(context.Background(), d); !errors.Is(err, ErrBadDigest) {
			t.Errorf("Open(%q): %v, want ErrBadDigest", d, err)
		}
	}
}
