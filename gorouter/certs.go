package gorouter

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"
)

// certStore serves the certificates of a directory by SNI and reloads them
// when the files change, so renewing a certificate needs no restart.
type certStore struct {
	dir     string
	log     *slog.Logger
	certs   atomic.Pointer[[]tls.Certificate]
	modTime time.Time // newest file time of the loaded set
}

func newCertStore(dir string, log *slog.Logger) (*certStore, error) {
	s := &certStore{dir: dir, log: log}
	certs, mod, err := loadCertificates(dir)
	if err != nil {
		return nil, err
	}
	s.certs.Store(&certs)
	s.modTime = mod
	return s, nil
}

// tlsConfig picks a certificate per handshake from the current set.
func (s *certStore) tlsConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: s.get}
}

func (s *certStore) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	list := *s.certs.Load()
	for i := range list {
		if hello.SupportsCertificate(&list[i]) == nil {
			return &list[i], nil
		}
	}
	// No name matches (or no SNI): the first certificate, as Go does.
	return &list[0], nil
}

// watch reloads the set every interval when a file is newer, until ctx is
// done. A set that fails to load is logged and the old one kept.
func (s *certStore) watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		mod, err := newestModTime(s.dir)
		if err != nil || !mod.After(s.modTime) {
			continue
		}
		certs, mod, err := loadCertificates(s.dir)
		if err != nil {
			s.log.Error("reload certificates; keeping the loaded ones", "dir", s.dir, "err", err)
			s.modTime = mod // do not retry the same broken files every tick
			continue
		}
		s.certs.Store(&certs)
		s.modTime = mod
		s.log.Info("reloaded certificates", "dir", s.dir, "count", len(certs))
	}
}

func newestModTime(dir string) (time.Time, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return time.Time{}, fmt.Errorf("list %s: %w", dir, err)
	}
	var newest time.Time
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".crt") || strings.HasSuffix(e.Name(), ".key") {
			if info, err := e.Info(); err == nil && info.ModTime().After(newest) {
				newest = info.ModTime()
			}
		}
	}
	return newest, nil
}

// loadCertificates reads every <name>.crt with its <name>.key from dir.
func loadCertificates(dir string) ([]tls.Certificate, time.Time, error) {
	if dir == "" {
		return nil, time.Time{}, errors.New("tls cert dir: required for the TLS listener")
	}
	mod, err := newestModTime(dir)
	if err != nil {
		return nil, time.Time{}, err
	}
	crts, err := filepath.Glob(filepath.Join(dir, "*.crt"))
	if err != nil {
		return nil, mod, fmt.Errorf("list certificates in %s: %w", dir, err)
	}
	var certs []tls.Certificate
	for _, crt := range crts {
		key := strings.TrimSuffix(crt, ".crt") + ".key"
		c, err := tls.LoadX509KeyPair(crt, key)
		if err != nil {
			return nil, mod, fmt.Errorf("load certificate %s with key %s: %w", crt, key, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, mod, fmt.Errorf("tls cert dir %s: no <name>.crt + <name>.key pair", dir)
	}
	return certs, mod, nil
}
