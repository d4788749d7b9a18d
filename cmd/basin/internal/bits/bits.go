// Package bits gathers an app's files for upload as cf push does: walk the
// app's directory minus what .cfignore names, hash every file, and pack the
// ones the server lacks into a zip.
package bits

import (
	"archive/zip"
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// File is one file of the app.
type File struct {
	// Path is slash-separated, relative to the app's root.
	Path   string
	Digest string // "sha256:<hex>"
	Size   int64
	Mode   fs.FileMode
	abs    string
}

// alwaysIgnored are cf's defaults, never uploaded.
var alwaysIgnored = []string{".cfignore", "_darcs", ".DS_Store", ".git", ".gitignore", ".hg", "manifest.yml", ".svn"}

// Ignore is a parsed .cfignore (gitignore syntax: globs, a trailing / for
// directories only, a leading / anchors at the root, ! re-includes).
type Ignore struct {
	rules []rule
}

type rule struct {
	pattern  string
	negate   bool
	dirOnly  bool
	anchored bool
}

// ParseIgnore reads .cfignore text.
func ParseIgnore(text string) *Ignore {
	ig := &Ignore{}
	for _, p := range alwaysIgnored {
		ig.rules = append(ig.rules, rule{pattern: p})
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		r := rule{}
		if strings.HasPrefix(line, "!") {
			r.negate, line = true, line[1:]
		}
		if strings.HasSuffix(line, "/") {
			r.dirOnly, line = true, strings.TrimSuffix(line, "/")
		}
		if strings.HasPrefix(line, "/") {
			r.anchored, line = true, strings.TrimPrefix(line, "/")
		} else if strings.Contains(line, "/") {
			r.anchored = true
		}
		r.pattern = line
		ig.rules = append(ig.rules, r)
	}
	return ig
}

// Ignored says whether rel (slash-separated) is ignored; isDir for directories.
func (ig *Ignore) Ignored(rel string, isDir bool) bool {
	ignored := false
	for _, r := range ig.rules {
		if r.dirOnly && !isDir {
			continue
		}
		if r.match(rel) {
			ignored = !r.negate
		}
	}
	return ignored
}

func (r rule) match(rel string) bool {
	if strings.Contains(r.pattern, "**") {
		// "**/x" and "x/**": match at any depth.
		p := strings.ReplaceAll(r.pattern, "**/", "")
		p = strings.TrimSuffix(p, "/**")
		for s := rel; ; {
			if ok, _ := path.Match(p, s); ok {
				return true
			}
			i := strings.Index(s, "/")
			if i < 0 {
				return false
			}
			s = s[i+1:]
		}
	}
	if r.anchored {
		ok, _ := path.Match(r.pattern, rel)
		return ok
	}
	ok, _ := path.Match(r.pattern, path.Base(rel))
	return ok
}

// Walk lists the app's regular files under root, sorted, minus those
// .cfignore (and cf's defaults) ignore. Symlinks are followed only when
// they stay inside root; others are refused.
func Walk(root string) ([]File, error) {
	text, err := os.ReadFile(filepath.Join(root, ".cfignore"))
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("read .cfignore: %w", err)
	}
	ig := ParseIgnore(string(text))
	var files []File
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		if ig.Ignored(rel, d.IsDir()) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return nil
		}
		info, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("app file %s: %w", rel, err)
		}
		if d.Type()&fs.ModeSymlink != 0 {
			target, err := filepath.EvalSymlinks(p)
			if err != nil {
				return fmt.Errorf("app file %s: %w", rel, err)
			}
			absRoot, _ := filepath.EvalSymlinks(root)
			if r, err := filepath.Rel(absRoot, target); err != nil || strings.HasPrefix(r, "..") {
				return fmt.Errorf("app file %s links outside the app (%s): copy it in or add it to .cfignore", rel, target)
			}
		}
		if !info.Mode().IsRegular() {
			return nil
		}
		digest, err := hashFile(p)
		if err != nil {
			return err
		}
		files = append(files, File{Path: rel, Digest: digest, Size: info.Size(), Mode: info.Mode().Perm(), abs: p})
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	return files, nil
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// Zip writes files as a zip archive to w, keeping their modes.
func Zip(w io.Writer, files []File) error {
	zw := zip.NewWriter(w)
	for _, f := range files {
		h := &zip.FileHeader{Name: f.Path, Method: zip.Deflate}
		h.SetMode(f.Mode)
		fw, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		src, err := os.Open(f.abs)
		if err != nil {
			return err
		}
		_, err = io.Copy(fw, src)
		src.Close()
		if err != nil {
			return fmt.Errorf("pack %s: %w", f.Path, err)
		}
	}
	return zw.Close()
}

// IsArchive says whether path is a file cf pushes as is (a zip, jar or war).
func IsArchive(p string) bool {
	st, err := os.Stat(p)
	if err != nil || st.IsDir() {
		return false
	}
	switch strings.ToLower(filepath.Ext(p)) {
	case ".zip", ".jar", ".war":
		return true
	}
	return false
}
