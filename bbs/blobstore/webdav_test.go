package blobstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// startNginx runs nginx with the DAV module on a loopback port, the way a
// multi-machine installation would serve blobs, and returns the base URL.
func startNginx(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		t.Skip("nginx not installed (basin setup --for-tests installs it): cannot test the WebDAV blobstore")
	}
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	for _, d := range []string{"logs", "tmp", "data/blobs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf := fmt.Sprintf(`
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/logs/error.log;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path %[1]s/tmp;
  proxy_temp_path %[1]s/tmp;
  fastcgi_temp_path %[1]s/tmp;
  uwsgi_temp_path %[1]s/tmp;
  scgi_temp_path %[1]s/tmp;
  server {
    listen %[2]s;
    location /blobs/ {
      root %[1]s/data;
      dav_methods PUT DELETE;
      create_full_put_path on;
      client_max_body_size 2g;
      autoindex on;
      autoindex_format json;
    }
  }
}
`, dir, addr)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-p", dir, "-e", filepath.Join(dir, "logs/error.log"), "-c", confPath, "-g", "daemon off; user root;")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "logs/error.log"))
			t.Fatalf("nginx did not listen on %s: %s", addr, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "http://" + addr + "/blobs/"
}

func TestWebDAVAgainstNginx(t *testing.T) {
	base := startNginx(t)
	s, err := NewWebDAV(base, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if list, err := s.List(ctx); err != nil || len(list) != 0 {
		t.Fatalf("list of an empty store: %v %v", list, err)
	}
	content := bytes.Repeat([]byte("droplet "), 100000)
	d, n, err := s.Put(ctx, bytes.NewReader(content), digestOf(content), 1<<30)
	if err != nil || d != digestOf(content) || n != int64(len(content)) {
		t.Fatalf("put: %s %d %v", d, n, err)
	}
	if _, _, err := s.Put(ctx, bytes.NewReader([]byte("x")), d, 1<<30); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("put with a wrong digest: %v", err)
	}
	if _, _, err := s.Put(ctx, bytes.NewReader(content), "", 10); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("put past the limit: %v", err)
	}
	r, size, err := s.Open(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	got.ReadFrom(r)
	r.Close()
	if size != int64(len(content)) || !bytes.Equal(got.Bytes(), content) {
		t.Fatalf("open gave %d bytes (size %d)", got.Len(), size)
	}
	ok, stored, err := s.Stat(ctx, d)
	if err != nil || !ok || time.Since(stored) > time.Hour {
		t.Fatalf("stat: %v %v %v", ok, stored, err)
	}
	list, err := s.List(ctx)
	if err != nil || len(list) != 1 || list[0] != d {
		t.Fatalf("list: %v %v", list, err)
	}
	if err := s.Delete(ctx, d); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Open(ctx, d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("open after delete: %v", err)
	}
	if ok, _, _ := s.Stat(ctx, d); ok {
		t.Fatal("stat after delete says present")
	}
	if err := s.Delete(ctx, d); err != nil {
		t.Fatalf("deleting a missing blob: %v", err)
	}
}
