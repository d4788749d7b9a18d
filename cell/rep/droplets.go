package rep

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// ErrDroplet wraps every failure to get a droplet onto the cell.
var ErrDroplet = errors.New("droplet unavailable")

// dropletCache keeps fetched droplets under dir by digest: each digest is
// downloaded once per cell, however many instances start at once.
type dropletCache struct {
	dir     string
	http    *http.Client
	blobs   Blobs // the BBS's blobstore, for droplets named by digest alone
	max     int64
	m       *Metrics
	fetches atomic.Int64

	fetching fetchGroup

	// present maps the digests known to be in dir to their paths, so a
	// start needs no digest check and no stat. Nothing in the rep removes
	// a cached droplet; one removed behind its back is forgotten when a
	// start fails for a missing file (forgetMissing).
	mu      sync.RWMutex
	present map[string]string
}

// fetchGroup runs one fetch per key at a time: callers asking for a key
// being fetched wait for that fetch instead of starting another.
type fetchGroup struct {
	mu       sync.Mutex
	inflight map[string]*fetchCall
}

type fetchCall struct {
	done chan struct{}
	path string
	err  error
}

// do returns fetch's result for key, running it unless a fetch of key is
// under way. fetch gets a ctx no caller's cancellation ends: others may be
// waiting on its result.
func (g *fetchGroup) do(ctx context.Context, key string, fetch func(context.Context) (string, error)) (string, error) {
	g.mu.Lock()
	call := g.inflight[key]
	if call == nil {
		if g.inflight == nil {
			g.inflight = map[string]*fetchCall{}
		}
		call = &fetchCall{done: make(chan struct{})}
		g.inflight[key] = call
		g.mu.Unlock()
		call.path, call.err = fetch(context.WithoutCancel(ctx))
		g.mu.Lock()
		delete(g.inflight, key)
		g.mu.Unlock()
		close(call.done)
	} else {
		g.mu.Unlock()
	}
	select {
	case <-call.done:
		return call.path, call.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// Blobs downloads blobs by digest; *bbs.Client does, from the BBS's blobstore.
type Blobs interface {
	DownloadBlob(ctx context.Context, digest string, w io.Writer) (int64, error)
}

func newDropletCache(dir string, hc *http.Client, blobs Blobs, maxBytes int64, m *Metrics) *dropletCache {
	return &dropletCache{dir: dir, http: hc, blobs: blobs, max: maxBytes, m: m, present: map[string]string{}}
}

func (c *dropletCache) remember(digest, path string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.present[digest] = path
}

// forgetMissing forgets the droplet when err (a failed container start
// from it) says a file is missing, so the next get looks on disk again.
func (c *dropletCache) forgetMissing(digest string, err error) {
	if !errors.Is(err, fs.ErrNotExist) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.present, digest)
}

// get returns the local path of the droplet, fetching it if needed. The
// content is verified against the digest before it is kept.
func (c *dropletCache) get(ctx context.Context, ref *basinv1.DropletRef) (string, error) {
	digest := ref.GetDigest()
	c.mu.RLock()
	path, ok := c.present[digest]
	c.mu.RUnlock()
	if ok {
		return path, nil
	}
	hexSum, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || len(hexSum) != 64 {
		return "", fmt.Errorf("%w: digest %q is not sha256:<64 hex>", ErrDroplet, digest)
	}
	if _, err := hex.DecodeString(hexSum); err != nil {
		return "", fmt.Errorf("%w: digest %q is not sha256:<64 hex>", ErrDroplet, digest)
	}
	path = filepath.Join(c.dir, "sha256-"+hexSum+".tgz")
	if _, err := os.Stat(path); err == nil {
		c.remember(digest, path)
		return path, nil
	}
	p, err := c.fetching.do(ctx, digest, func(ctx context.Context) (string, error) { return c.fetch(ctx, ref, path) })
	if err != nil && ctx.Err() != nil {
		return "", fmt.Errorf("wait for droplet %s: %w", digest, err)
	}
	return p, err
}

func (c *dropletCache) fetch(ctx context.Context, ref *basinv1.DropletRef, path string) (string, error) {
	if ref.GetUrl() == "" {
		if c.blobs == nil {
			return "", fmt.Errorf("%w: droplet %s has no url and this cell has no blobstore", ErrDroplet, ref.GetDigest())
		}
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		pr, pw := io.Pipe()
		done := make(chan struct{})
		defer func() { pr.Close(); <-done }()
		go func() {
			defer close(done)
			_, err := c.blobs.DownloadBlob(ctx, ref.GetDigest(), pw)
			pw.CloseWithError(err)
		}()
		return c.store(ref, pr, path)
	}
	u, err := url.Parse(ref.GetUrl())
	if err != nil {
		return "", fmt.Errorf("%w: droplet url %q: %v", ErrDroplet, ref.GetUrl(), err)
	}
	var body io.ReadCloser
	switch u.Scheme {
	case "file":
		f, err := os.Open(u.Path)
		if err != nil {
			return "", fmt.Errorf("%w: open droplet: %v", ErrDroplet, err)
		}
		body = f
	case "http", "https":
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return "", fmt.Errorf("%w: droplet request: %v", ErrDroplet, err)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return "", fmt.Errorf("%w: fetch droplet %s: %v", ErrDroplet, u.Redacted(), err)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return "", fmt.Errorf("%w: fetch droplet %s: status %d", ErrDroplet, u.Redacted(), resp.StatusCode)
		}
		body = resp.Body
	default:
		return "", fmt.Errorf("%w: droplet url scheme %q (want file, http or https)", ErrDroplet, u.Scheme)
	}
	defer body.Close()
	return c.store(ref, body, path)
}

func source(ref *basinv1.DropletRef) string {
	if ref.GetUrl() == "" {
		return "the blobstore"
	}
	if u, err := url.Parse(ref.GetUrl()); err == nil {
		return u.Redacted()
	}
	return "its url"
}

// blobsOf returns the BBS client's blobstore when it has one.
func blobsOf(b BBS) Blobs {
	blobs, _ := b.(Blobs)
	return blobs
}

// store copies a fetched droplet into the cache, verifying its digest.
func (c *dropletCache) store(ref *basinv1.DropletRef, body io.Reader, path string) (string, error) {
	c.fetches.Add(1)
	c.m.dropletFetches.Inc()
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return "", fmt.Errorf("%w: droplet cache %s: %v", ErrDroplet, c.dir, err)
	}
	tmp, err := os.CreateTemp(c.dir, ".fetch-*")
	if err != nil {
		return "", fmt.Errorf("%w: droplet cache: %v", ErrDroplet, err)
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(body, c.max+1))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("%w: download droplet %s: %v", ErrDroplet, ref.GetDigest(), err)
	}
	if n > c.max {
		return "", fmt.Errorf("%w: droplet %s is larger than %d bytes", ErrDroplet, ref.GetDigest(), c.max)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != ref.GetDigest() {
		return "", fmt.Errorf("%w: droplet from %s is %s, want %s", ErrDroplet, source(ref), got, ref.GetDigest())
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("%w: droplet cache: %v", ErrDroplet, err)
	}
	c.remember(ref.GetDigest(), path)
	return path, nil
}
