package lifecycle

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Droplet files are owned by vcap, who runs the app.
const (
	dropletUID = 2000
	dropletGID = 2000
)

// StagingInfo is the droplet's staging_info.yml (JSON, a subset of YAML, as
// Cloud Foundry writes it).
type StagingInfo struct {
	DetectedBuildpack string `json:"detected_buildpack"`
	StartCommand      string `json:"start_command"`
}

// writeDroplet packs app/ (the build dir), deps/, profile.d/, tmp/, logs/
// and staging_info.yml into OutputDroplet, written atomically.
func (r *run) writeDroplet(res Result) (err error) {
	path := r.cfg.OutputDroplet
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".droplet-*.tgz")
	if err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	zw := gzip.NewWriter(f)
	tw := tar.NewWriter(zw)
	now := time.Now()
	for _, d := range []struct{ name, src string }{
		{"app", r.cfg.BuildDir}, {"deps", r.depsDir}, {"profile.d", r.profileDir}, {"tmp", ""}, {"logs", ""},
	} {
		if d.src == "" {
			if err := tw.WriteHeader(dirHeader(d.name, 0o755, now)); err != nil {
				return fmt.Errorf("droplet: %w", err)
			}
			continue
		}
		if err := addTree(tw, d.src, d.name); err != nil {
			return fmt.Errorf("droplet: %s: %w", d.name, err)
		}
	}
	info, err := json.Marshal(StagingInfo{DetectedBuildpack: res.DetectedBuildpack, StartCommand: res.StartCommand})
	if err != nil {
		return err
	}
	hdr := &tar.Header{Typeflag: tar.TypeReg, Name: "staging_info.yml", Mode: 0o644, Size: int64(len(info)),
		Uid: dropletUID, Gid: dropletGID, Uname: "vcap", Gname: "vcap", ModTime: now}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	if _, err := tw.Write(info); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("droplet: %w", err)
	}
	return nil
}

func dirHeader(name string, mode int64, mtime time.Time) *tar.Header {
	return &tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode,
		Uid: dropletUID, Gid: dropletGID, Uname: "vcap", Gname: "vcap", ModTime: mtime}
}

// addTree adds the tree at src under prefix, with vcap as owner and the
// files' own modes. Symbolic links are kept; sockets, fifos and devices
// (which no droplet can carry) are skipped.
func addTree(tw *tar.Writer, src, prefix string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(filepath.Join(prefix, rel))
		fi, err := d.Info()
		if err != nil {
			return err
		}
		mode := int64(fi.Mode().Perm())
		switch {
		case fi.IsDir():
			return tw.WriteHeader(dirHeader(name, mode, fi.ModTime()))
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777,
				Uid: dropletUID, Gid: dropletGID, Uname: "vcap", Gname: "vcap", ModTime: fi.ModTime()})
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			hdr := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: fi.Size(),
				Uid: dropletUID, Gid: dropletGID, Uname: "vcap", Gname: "vcap", ModTime: fi.ModTime()}
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			n, err := io.Copy(tw, f)
			if err != nil {
				return err
			}
			if n != fi.Size() {
				return fmt.Errorf("%s changed size while being packed", p)
			}
			return nil
		default:
			return nil
		}
	})
}
