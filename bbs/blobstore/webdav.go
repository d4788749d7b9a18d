package blobstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// WebDAV keeps blobs on a WebDAV server: nginx with its DAV module, which is
// what Cloud Foundry runs as its internal blobstore. Several BBS replicas and
// cells on many machines share it. Listing uses nginx's JSON autoindex, since
// its DAV module has no PROPFIND.
//
// nginx writes a PUT body to a temporary file and renames it into place, so
// a blob is whole or absent there too.
type WebDAV struct {
	base   *url.URL // e.g. http://blobs.internal:8081/blobs/
	client *http.Client
	tmpDir string
}

var _ Store = (*WebDAV)(nil)

// NewWebDAV uses the collection at baseURL; tmpDir spools uploads while
// their digest is computed (the name is the digest, known only at the end).
func NewWebDAV(baseURL, tmpDir string, client *http.Client) (*WebDAV, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("webdav blobstore URL %q: must be http(s)://host[:port]/path/", baseURL)
	}
	if !strings.HasSuffix(u.Path, "/") {
		u.Path += "/"
	}
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{
			MaxIdleConnsPerHost:   16,
			IdleConnTimeout:       90 * time.Second,
			ResponseHeaderTimeout: 60 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
		}}
	}
	if err := os.MkdirAll(tmpDir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", tmpDir, err)
	}
	return &WebDAV{base: u, client: client, tmpDir: tmpDir}, nil
}

func (w *WebDAV) url(digest string) string {
	return w.base.JoinPath("sha256", strings.TrimPrefix(digest, "sha256:")).String()
}

func (w *WebDAV) do(ctx context.Context, method, u string, body io.Reader, size int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.ContentLength = size
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u, err)
	}
	return resp, nil
}

// Put implements Store.
func (w *WebDAV) Put(ctx context.Context, r io.Reader, want string, limit int64) (string, int64, error) {
	if want != "" {
		if err := CheckDigest(want); err != nil {
			return "", 0, err
		}
	}
	tmp, digest, n, err := spool(ctx, r, w.tmpDir, want, limit)
	if err != nil {
		return "", 0, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return "", 0, err
	}
	resp, err := w.do(ctx, http.MethodPut, w.url(digest), tmp, n)
	if err != nil {
		return "", 0, err
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		return "", 0, fmt.Errorf("store blob %s on %s: %s", digest, w.base.Host, resp.Status)
	}
	return digest, n, nil
}

// Open implements Store.
func (w *WebDAV) Open(ctx context.Context, digest string) (io.ReadCloser, int64, error) {
	if err := CheckDigest(digest); err != nil {
		return nil, 0, err
	}
	resp, err := w.do(ctx, http.MethodGet, w.url(digest), nil, 0)
	if err != nil {
		return nil, 0, err
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return resp.Body, resp.ContentLength, nil
	case http.StatusNotFound:
		drain(resp)
		return nil, 0, fmt.Errorf("%s: %w", digest, ErrNotFound)
	default:
		drain(resp)
		return nil, 0, fmt.Errorf("get blob %s from %s: %s", digest, w.base.Host, resp.Status)
	}
}

// Stat implements Store.
func (w *WebDAV) Stat(ctx context.Context, digest string) (bool, time.Time, error) {
	if err := CheckDigest(digest); err != nil {
		return false, time.Time{}, err
	}
	resp, err := w.do(ctx, http.MethodHead, w.url(digest), nil, 0)
	if err != nil {
		return false, time.Time{}, err
	}
	drain(resp)
	switch resp.StatusCode {
	case http.StatusOK:
		t, _ := http.ParseTime(resp.Header.Get("Last-Modified"))
		return true, t, nil
	case http.StatusNotFound:
		return false, time.Time{}, nil
	default:
		return false, time.Time{}, fmt.Errorf("stat blob %s on %s: %s", digest, w.base.Host, resp.Status)
	}
}

// List implements Store.
func (w *WebDAV) List(ctx context.Context) ([]string, error) {
	resp, err := w.do(ctx, http.MethodGet, w.base.JoinPath("sha256").String()+"/", nil, 0)
	if err != nil {
		return nil, err
	}
	defer drain(resp)
	if resp.StatusCode == http.StatusNotFound {
		return nil, nil // nothing uploaded yet
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("list blobs on %s: %s", w.base.Host, resp.Status)
	}
	var entries []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 256<<20)).Decode(&entries); err != nil {
		return nil, fmt.Errorf("list blobs on %s: %w (is autoindex_format json on?)", w.base.Host, err)
	}
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		if d := "sha256:" + e.Name; e.Type == "file" && digestRE.MatchString(d) {
			out = append(out, d)
		}
	}
	return out, nil
}

// Delete implements Store.
func (w *WebDAV) Delete(ctx context.Context, digest string) error {
	if err := CheckDigest(digest); err != nil {
		return err
	}
	resp, err := w.do(ctx, http.MethodDelete, w.url(digest), nil, 0)
	if err != nil {
		return err
	}
	drain(resp)
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNotFound {
		return errors.New("delete blob " + digest + " on " + w.base.Host + ": " + resp.Status)
	}
	return nil
}

// drain lets the connection be reused.
func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}
