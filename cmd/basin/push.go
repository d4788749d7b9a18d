package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/basinpaas/basin/apps"
	"github.com/basinpaas/basin/cmd/basin/internal/bits"
	"github.com/basinpaas/basin/cmd/basin/internal/manifest"
	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
)

type pushOptions struct {
	path, manifestPath, varsFile, droplet, strategy string
	buildpacks, vars                                []string
	instances                                       int32
	memory, disk, command, stack                    string
	noStart, noRoute, randomRoute, noManifest       bool
	healthType, endpoint                            string
	timeout                                         int
}

func newPushCommand() *cobra.Command {
	var o pushOptions
	c := &cobra.Command{
		Use:   "push [NAME] [flags]",
		Short: "Push an app: upload its files, stage them into a droplet, and run it",
		Long: `Push an app as cf push does: its files are uploaded (unchanged ones are
skipped), staged by buildpacks into a droplet with the output shown live,
and the app is started and routed at NAME.<domain>. Settings come from the
flags, else from manifest.yml (in the current directory, or -f), else from
the app's current settings. With --droplet a prebuilt droplet (a tar.gz) is
run as is and nothing is staged. With --strategy rolling the new version
takes traffic before the old one stops.`,
		Example: `  basin push myapp
  basin push myapp -p ./site -b staticfile -i 2 -m 128M
  basin push -f manifest.yml --var domain=apps.localhost
  basin push myapp --droplet droplet.tgz -s tiny --strategy rolling`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return push(cmd, args, o)
		},
	}
	f := c.Flags()
	f.StringVarP(&o.path, "path", "p", "", "app directory, or a zip/jar to push as is (default: the current directory)")
	f.StringArrayVarP(&o.buildpacks, "buildpack", "b", nil, "buildpack: an admin name, a digest, or a directory, zip or tar.gz to upload (repeat for several; the last is final)")
	f.Int32VarP(&o.instances, "instances", "i", 0, "number of instances")
	f.StringVarP(&o.memory, "memory", "m", "", "memory limit per instance (e.g. 256M, 1G)")
	f.StringVarP(&o.disk, "disk", "k", "", "disk limit per instance (e.g. 1G)")
	f.StringVarP(&o.command, "start-command", "c", "", "start command (default: the one staging found)")
	f.StringVarP(&o.stack, "stack", "s", "", "stack to run on (e.g. bookworm, tiny)")
	f.BoolVar(&o.noStart, "no-start", false, "upload and stage, but do not start")
	f.BoolVar(&o.noRoute, "no-route", false, "do not route the app")
	f.BoolVar(&o.randomRoute, "random-route", false, "route the app at a random host")
	f.StringVarP(&o.healthType, "health-check-type", "u", "", "port, http or process")
	f.StringVar(&o.endpoint, "endpoint", "", "path of the http health check (default /)")
	f.IntVarP(&o.timeout, "timeout", "t", 0, "seconds an instance may take to become healthy")
	f.StringVar(&o.strategy, "strategy", "", "rolling: start the new version before stopping the old")
	f.StringVarP(&o.manifestPath, "manifest", "f", "", "manifest file (default: manifest.yml here, when present)")
	f.BoolVar(&o.noManifest, "no-manifest", false, "ignore manifest.yml")
	f.StringArrayVar(&o.vars, "var", nil, "manifest variable NAME=VALUE (repeatable)")
	f.StringVar(&o.varsFile, "vars-file", "", "YAML file of manifest variables")
	f.StringVar(&o.droplet, "droplet", "", "prebuilt droplet (tar.gz) to run instead of staging")
	return c
}

// pushPlan is one app to push: the manifest's settings with the flags on top.
type pushPlan struct {
	manifest.App
	healthSet bool
}

func plans(cmd *cobra.Command, args []string, o pushOptions) ([]pushPlan, error) {
	vars := map[string]string{}
	if o.varsFile != "" {
		if err := manifest.ReadVarsFile(o.varsFile, vars); err != nil {
			return nil, err
		}
	}
	for _, v := range o.vars {
		k, val, err := manifest.ParseVar(v)
		if err != nil {
			return nil, err
		}
		vars[k] = val
	}
	mpath := o.manifestPath
	if mpath == "" && !o.noManifest {
		if _, err := os.Stat("manifest.yml"); err == nil {
			mpath = "manifest.yml"
		}
	}
	var list []manifest.App
	if mpath != "" {
		m, err := manifest.Load(mpath, vars)
		if err != nil {
			return nil, err
		}
		list = m.Apps
	}
	if len(args) == 1 {
		var found []manifest.App
		for _, a := range list {
			if a.Name == args[0] {
				found = append(found, a)
			}
		}
		if len(found) == 0 {
			if len(list) > 1 {
				return nil, fmt.Errorf("app %s is not in the manifest %s", args[0], mpath)
			}
			// A one-app manifest applies to the named app too, as cf does.
			found = []manifest.App{{Name: args[0]}}
			if len(list) == 1 {
				found[0] = list[0]
				found[0].Name = args[0]
			}
		}
		list = found
	}
	if len(list) == 0 {
		return nil, ui.WithHint(errors.New("no app to push"), "Name it (`basin push NAME`) or give a manifest (-f manifest.yml).")
	}
	if len(list) > 1 && (o.path != "" || o.droplet != "" || cmd.Flags().Changed("instances") || o.command != "") {
		return nil, errors.New("flags like -p, -i, -c and --droplet apply to one app: name the app to push from the manifest")
	}
	var out []pushPlan
	for _, a := range list {
		p := pushPlan{App: a}
		if o.path != "" {
			p.Path = o.path
		}
		if cmd.Flags().Changed("instances") {
			n := o.instances
			p.Instances = &n
		}
		if o.memory != "" {
			mb, err := manifest.ParseMB(o.memory)
			if err != nil {
				return nil, fmt.Errorf("-m: %w", err)
			}
			p.MemoryMB = &mb
		}
		if o.disk != "" {
			mb, err := manifest.ParseMB(o.disk)
			if err != nil {
				return nil, fmt.Errorf("-k: %w", err)
			}
			p.DiskMB = &mb
		}
		if len(o.buildpacks) > 0 {
			p.Buildpacks = o.buildpacks
		}
		if cmd.Flags().Changed("start-command") {
			c := o.command
			p.Command = &c
		}
		if o.stack != "" {
			p.Stack = o.stack
		}
		if o.noRoute {
			p.NoRoute, p.Routes = true, nil
		}
		if o.randomRoute {
			p.RandomRoute = true
		}
		if o.healthType != "" {
			switch o.healthType {
			case "port", "http", "process":
			case "none":
				o.healthType = "process"
			default:
				return nil, fmt.Errorf("--health-check-type %q: must be port, http or process", o.healthType)
			}
			p.HealthCheckType = o.healthType
		}
		if o.endpoint != "" {
			p.HealthCheckHTTP = o.endpoint
		}
		if o.timeout != 0 {
			t := o.timeout
			p.Timeout = &t
		}
		p.healthSet = p.HealthCheckType != "" || p.HealthCheckHTTP != "" || p.Timeout != nil
		out = append(out, p)
	}
	return out, nil
}

func healthCheck(p pushPlan) *basinv1.HealthCheck {
	h := &basinv1.HealthCheck{HttpEndpoint: p.HealthCheckHTTP}
	switch p.HealthCheckType {
	case "http":
		h.Type = basinv1.HealthCheckType_HEALTH_CHECK_TYPE_HTTP
		if h.HttpEndpoint == "" {
			h.HttpEndpoint = "/"
		}
	case "process":
		h.Type = basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PROCESS
	default:
		h.Type = basinv1.HealthCheckType_HEALTH_CHECK_TYPE_PORT
	}
	if p.Timeout != nil {
		h.StartTimeoutMs = int64(*p.Timeout) * 1000
	}
	return h
}

// parseRoute reads host.domain[/path].
func parseRoute(s string) *basinv1.Route {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "http://"), "https://")
	host, path, _ := strings.Cut(s, "/")
	r := &basinv1.Route{Host: strings.ToLower(host)}
	if path != "" {
		r.Path = "/" + path
	}
	return r
}

func randomHost(name string) string {
	words := []string{"brave", "calm", "eager", "fancy", "jolly", "lucky", "proud", "quick", "sunny", "witty"}
	nouns := []string{"otter", "heron", "lynx", "panda", "koala", "fox", "wren", "seal", "bison", "crane"}
	b := make([]byte, 3)
	rand.Read(b)
	return fmt.Sprintf("%s-%s-%s-%02d", apps.DefaultHost(name), words[int(b[0])%len(words)], nouns[int(b[1])%len(nouns)], int(b[2])%100)
}

func push(cmd *cobra.Command, args []string, o pushOptions) error {
	switch o.strategy {
	case "", "default", "rolling":
	default:
		return fmt.Errorf("--strategy %q: the strategies are rolling and default", o.strategy)
	}
	ps, err := plans(cmd, args, o)
	if err != nil {
		return err
	}
	s, err := connect(cmd)
	if err != nil {
		return err
	}
	info, err := s.apps.GetInfo(cmd.Context(), &basinv1.GetInfoRequest{})
	if err != nil {
		return fmt.Errorf("push: reach the app layer: %w", err)
	}
	for _, p := range ps {
		if p.Buildpacks, err = uploadPathBuildpacks(cmd.Context(), s, p.Buildpacks); err != nil {
			return err
		}
		if err := pushOne(cmd.Context(), s, info, p, o); err != nil {
			return err
		}
	}
	return nil
}

func pushOne(ctx context.Context, s *session, info *basinv1.GetInfoResponse, p pushPlan, o pushOptions) error {
	u := s.ui
	name := p.Name
	u.Say("Pushing app %s to %s...", u.Cyan(name), s.target.API)

	// The app: created with the plan's settings, or updated with them.
	var a *basinv1.App
	got, err := s.apps.GetApp(ctx, &basinv1.GetAppRequest{Name: name})
	switch {
	case status.Code(err) == codes.NotFound:
		spec := &basinv1.App{Name: name, Buildpacks: p.Buildpacks, Env: p.Env, Stack: p.Stack, Instances: 1}
		if p.Instances != nil {
			spec.Instances = *p.Instances
		}
		if p.MemoryMB != nil {
			spec.MemoryMb = *p.MemoryMB
		}
		if p.DiskMB != nil {
			spec.DiskMb = *p.DiskMB
		}
		if p.Command != nil {
			spec.Command = *p.Command
		}
		spec.HealthCheck = healthCheck(p)
		spec.Routes = planRoutes(p, name, info.GetDomain(), nil)
		r, err := s.apps.CreateApp(ctx, &basinv1.CreateAppRequest{App: spec})
		if err != nil {
			return fmt.Errorf("create app %s: %w", name, err)
		}
		a = r.GetApp()
		u.Say("Creating app %s (%d instance(s), %s memory, %s disk, stack %s)", name, a.GetInstances(), ui.MB(a.GetMemoryMb()), ui.MB(a.GetDiskMb()), a.GetStack())
	case err != nil:
		return fmt.Errorf("read app %s: %w", name, err)
	default:
		cur := got.GetApp()
		req := &basinv1.UpdateAppRequest{Name: name, Instances: p.Instances, MemoryMb: p.MemoryMB, DiskMb: p.DiskMB, Command: p.Command, IfRevision: cur.GetRevision()}
		if p.Stack != "" {
			req.Stack = &p.Stack
		}
		if p.Buildpacks != nil {
			req.Buildpacks = &basinv1.StringList{Values: p.Buildpacks}
		}
		if p.Env != nil {
			env := map[string]string{}
			for k, v := range cur.GetEnv() {
				env[k] = v
			}
			for k, v := range p.Env {
				env[k] = v
			}
			req.Env = &basinv1.StringMap{Values: env}
		}
		if p.healthSet {
			req.HealthCheck = healthCheck(p)
		}
		if rs := planRoutes(p, name, info.GetDomain(), cur.GetRoutes()); rs != nil {
			req.Routes = &basinv1.RouteList{Routes: rs}
		}
		r, err := s.apps.UpdateApp(ctx, req)
		if err != nil {
			return fmt.Errorf("update app %s: %w", name, err)
		}
		a = r.GetApp()
		u.Say("Updating app %s", name)
	}
	if len(a.GetRoutes()) > 0 {
		u.Say("Routes: %s", routeList(a.GetRoutes()))
	}

	// The droplet: prebuilt, or staged from the uploaded bits.
	if o.droplet != "" {
		if err := pushDroplet(ctx, s, name, o.droplet); err != nil {
			return err
		}
	} else {
		digest, err := uploadBits(ctx, s, a, p.Path)
		if err != nil {
			return err
		}
		if err := stage(ctx, s, a, digest); err != nil {
			return err
		}
	}
	if o.noStart {
		u.Say("Not starting the app (--no-start).")
		u.OK()
		return nil
	}

	u.Say("Waiting for app %s to start...", u.Cyan(name))
	rolling := o.strategy == "rolling" && a.GetState() == basinv1.AppState_APP_STATE_STARTED && len(a.GetProcessGuids()) > 0
	if rolling {
		if err := roll(ctx, s, name); err != nil {
			return err
		}
	} else if _, err := s.apps.RestartApp(ctx, &basinv1.RestartAppRequest{Name: name}); err != nil {
		return fmt.Errorf("start app %s: %w", name, err)
	}
	resp, err := waitRunning(ctx, s, name, startTimeout)
	if err != nil {
		return err
	}
	fmt.Fprintln(u.Out)
	printSummary(u, resp, time.Now())
	return nil
}

// isBuildpackPath says whether a -b value names a buildpack on this machine
// (a directory, or a zip or tar.gz) rather than an admin buildpack or a
// digest: admin names have no slash, so only an existing path with one, or
// an existing archive, counts.
func isBuildpackPath(bp string) bool {
	if strings.HasPrefix(bp, "sha256:") {
		return false
	}
	st, err := os.Stat(bp)
	if err != nil {
		return false
	}
	if st.IsDir() {
		return strings.ContainsRune(bp, filepath.Separator) || bp == "."
	}
	lower := strings.ToLower(bp)
	return strings.HasSuffix(lower, ".zip") || strings.HasSuffix(lower, ".tgz") || strings.HasSuffix(lower, ".tar.gz")
}

// uploadPathBuildpacks replaces each buildpack given as a path, as with
// cf push -b ./my-buildpack, by the digest of its archive in the blobstore:
// a directory is zipped with its files' modes, an archive is sent as is.
// The buildpack is used unchanged and not registered as an admin one.
func uploadPathBuildpacks(ctx context.Context, s *session, bps []string) ([]string, error) {
	var out []string
	for _, bp := range bps {
		if !isBuildpackPath(bp) {
			out = append(out, bp)
			continue
		}
		var body io.Reader
		if st, _ := os.Stat(bp); st.IsDir() {
			files, err := bits.Walk(bp)
			if err != nil {
				return nil, fmt.Errorf("read buildpack %s: %w", bp, err)
			}
			var buf bytes.Buffer
			if err := bits.Zip(&buf, files); err != nil {
				return nil, fmt.Errorf("pack buildpack %s: %w", bp, err)
			}
			body = &buf
		} else {
			f, err := os.Open(bp)
			if err != nil {
				return nil, fmt.Errorf("open buildpack %s: %w", bp, err)
			}
			defer f.Close()
			body = f
		}
		digest, size, err := s.bbs.UploadBlob(ctx, body, "")
		if err != nil {
			return nil, fmt.Errorf("upload buildpack %s: %w", bp, err)
		}
		s.ui.Say("Uploaded buildpack %s (%s) as %s", bp, ui.Bytes(size), digest)
		out = append(out, digest)
	}
	return out, nil
}

// planRoutes is the routes to set: the manifest's, none for no-route, a
// random or the default one for a new app (or one without routes); nil
// keeps the current ones.
func planRoutes(p pushPlan, name, domain string, cur []*basinv1.Route) []*basinv1.Route {
	switch {
	case p.NoRoute:
		return []*basinv1.Route{}
	case len(p.Routes) > 0:
		var rs []*basinv1.Route
		for _, r := range p.Routes {
			rs = append(rs, parseRoute(r))
		}
		return rs
	case len(cur) > 0:
		return nil
	case p.RandomRoute:
		return []*basinv1.Route{{Host: randomHost(name) + "." + domain}}
	default:
		return []*basinv1.Route{{Host: apps.DefaultHost(name) + "." + domain}}
	}
}

// stagingInfo is a droplet's staging_info.yml (JSON, as Cloud Foundry writes it).
type stagingInfo struct {
	DetectedBuildpack string `json:"detected_buildpack"`
	StartCommand      string `json:"start_command"`
}

// readStagingInfo finds staging_info.yml in a droplet.
func readStagingInfo(path string) (stagingInfo, error) {
	var si stagingInfo
	f, err := os.Open(path)
	if err != nil {
		return si, fmt.Errorf("open droplet: %w", err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		return si, fmt.Errorf("droplet %s is not a tar.gz: %w", path, err)
	}
	tr := tar.NewReader(gz)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return si, nil
		}
		if err != nil {
			return si, fmt.Errorf("droplet %s is not a tar.gz: %w", path, err)
		}
		if strings.TrimPrefix(h.Name, "./") == "staging_info.yml" {
			b, _ := io.ReadAll(io.LimitReader(tr, 1<<20))
			if err := json.Unmarshal(b, &si); err != nil {
				return si, fmt.Errorf("droplet %s: staging_info.yml is not JSON: %w", path, err)
			}
			return si, nil
		}
	}
}

func pushDroplet(ctx context.Context, s *session, name, path string) error {
	si, err := readStagingInfo(path)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open droplet: %w", err)
	}
	defer f.Close()
	digest, size, err := s.bbs.UploadBlob(ctx, f, "")
	if err != nil {
		return fmt.Errorf("upload droplet %s: %w", path, err)
	}
	s.ui.Say("Uploaded droplet %s (%s, %s)", filepath.Base(path), ui.Bytes(size), digest[:19])
	if _, err := s.apps.SetDroplet(ctx, &basinv1.SetDropletRequest{Name: name, DropletDigest: digest, DetectedBuildpack: si.DetectedBuildpack, StagedCommand: si.StartCommand}); err != nil {
		return fmt.Errorf("set droplet of %s: %w", name, err)
	}
	return nil
}

// uploadBits sends the app's files, only those the blobstore lacks, and
// records the package on the app.
func uploadBits(ctx context.Context, s *session, a *basinv1.App, path string) (string, error) {
	if path == "" {
		path = "."
	}
	noStaging := func(err error) error {
		if status.Code(err) == codes.Unimplemented {
			return ui.WithHint(fmt.Errorf("upload app files: staging is not available on this installation (the StagingService is not served)"),
				"Push a prebuilt droplet with --droplet PATH.")
		}
		return fmt.Errorf("upload app files: %w", err)
	}
	header := &basinv1.UploadBitsHeader{AppGuid: a.GetGuid()}
	var body io.Reader
	var files, skipped int
	var sent int64
	if bits.IsArchive(path) {
		f, err := os.Open(path)
		if err != nil {
			return "", fmt.Errorf("open %s: %w", path, err)
		}
		defer f.Close()
		st, _ := f.Stat()
		header.Format, body, sent, files = "zip", f, st.Size(), 1
	} else {
		all, err := bits.Walk(path)
		if err != nil {
			return "", fmt.Errorf("read app files in %s: %w", path, err)
		}
		if len(all) == 0 {
			return "", ui.WithHint(fmt.Errorf("no files to push in %s", path), "Give the app's directory with -p, or check .cfignore.")
		}
		req := &basinv1.MatchResourcesRequest{}
		for _, f := range all {
			req.Files = append(req.Files, &basinv1.ResourceFile{Path: f.Path, Digest: f.Digest, Size: f.Size, Mode: uint32(f.Mode)})
		}
		m, err := s.staging.MatchResources(ctx, req)
		if err != nil {
			return "", noStaging(err)
		}
		matched := map[string]bool{}
		for _, r := range m.GetMatched() {
			matched[r.GetPath()] = true
		}
		header.Matched = m.GetMatched()
		var rest []bits.File
		for _, f := range all {
			if !matched[f.Path] {
				rest = append(rest, f)
				sent += f.Size
			}
		}
		files, skipped = len(all), len(all)-len(rest)
		if len(rest) > 0 {
			var buf bytes.Buffer
			if err := bits.Zip(&buf, rest); err != nil {
				return "", fmt.Errorf("pack app files: %w", err)
			}
			header.Format, body = "zip", &buf
		}
	}
	stream, err := s.staging.UploadBits(ctx)
	if err != nil {
		return "", noStaging(err)
	}
	if err := stream.Send(&basinv1.UploadBitsRequest{Part: &basinv1.UploadBitsRequest_Header{Header: header}}); err != nil {
		_, rerr := stream.CloseAndRecv()
		return "", noStaging(errors.Join(err, rerr))
	}
	if body != nil {
		buf := make([]byte, 256<<10)
		for {
			n, rerr := body.Read(buf)
			if n > 0 {
				if err := stream.Send(&basinv1.UploadBitsRequest{Part: &basinv1.UploadBitsRequest_Chunk{Chunk: buf[:n]}}); err != nil {
					_, cerr := stream.CloseAndRecv()
					return "", noStaging(cerr)
				}
			}
			if rerr == io.EOF {
				break
			}
			if rerr != nil {
				return "", fmt.Errorf("read app files: %w", rerr)
			}
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return "", noStaging(err)
	}
	s.ui.Say("Uploaded %d file(s), %s sent; %d skipped as unchanged", files-skipped, ui.Bytes(sent), skipped)
	if _, err := s.apps.SetPackage(ctx, &basinv1.SetPackageRequest{Name: a.GetName(), PackageDigest: resp.GetBitsDigest()}); err != nil {
		return "", fmt.Errorf("record package of %s: %w", a.GetName(), err)
	}
	return resp.GetBitsDigest(), nil
}

// stage runs the staging task of the app's bits, streaming its output, and
// records the droplet on success. On failure it says which phase failed,
// with its exit code and output, and desires nothing.
func stage(ctx context.Context, s *session, a *basinv1.App, bitsDigest string) error {
	var env []*basinv1.EnvVar
	for k, v := range a.GetEnv() {
		env = append(env, &basinv1.EnvVar{Name: k, Value: v})
	}
	resp, err := s.staging.StageApp(ctx, &basinv1.StageAppRequest{AppGuid: a.GetGuid(), BitsDigest: bitsDigest, Stack: a.GetStack(), Buildpacks: a.GetBuildpacks(), Env: env})
	if status.Code(err) == codes.Unimplemented {
		return ui.WithHint(errors.New("stage app: staging is not available on this installation (the StagingService is not served)"),
			"Push a prebuilt droplet with --droplet PATH.")
	}
	if err != nil {
		return fmt.Errorf("stage app %s: %w", a.GetName(), err)
	}
	tg := resp.GetTaskGuid()
	s.ui.Say("Staging app %s (task %s)...", s.ui.Cyan(a.GetName()), tg)
	lctx, stopLogs := context.WithCancel(ctx)
	logsDone := make(chan struct{})
	go func() {
		defer close(logsDone)
		followLogs(lctx, s, &basinv1.StreamLogsRequest{Source: &basinv1.StreamLogsRequest_TaskGuid{TaskGuid: tg}, Follow: true}, true)
	}()
	task, err := waitTask(ctx, s, tg, 30*time.Minute)
	// Let the last lines arrive before saying how it ended.
	select {
	case <-logsDone:
	case <-time.After(2 * time.Second):
	}
	stopLogs()
	<-logsDone
	if err != nil {
		return fmt.Errorf("stage app %s: %w", a.GetName(), err)
	}
	res := &basinv1.StagingResult{}
	if task.GetResult() != "" {
		if err := protojson.Unmarshal([]byte(task.GetResult()), res); err != nil && !task.GetFailed() {
			return fmt.Errorf("stage app %s: unreadable staging result: %w", a.GetName(), err)
		}
	}
	if task.GetFailed() || res.GetDropletDigest() == "" {
		msg := fmt.Sprintf("staging failed")
		if res.GetFailedPhase() != "" {
			msg = fmt.Sprintf("staging failed in %s with exit code %d", res.GetFailedPhase(), res.GetExitCode())
		}
		if task.GetFailureReason() != "" {
			msg += ": " + task.GetFailureReason()
		}
		if res.GetOutputTail() != "" {
			msg += "\n--- output ---\n" + strings.TrimRight(res.GetOutputTail(), "\n")
		}
		todo := "Fix the app (or pick a buildpack with -b) and push again; nothing was started."
		if res.GetExitCode() == 222 {
			todo = "No buildpack recognised the app: name one with -b (see `basin buildpacks`)."
		}
		return ui.WithHint(fmt.Errorf("stage app %s: %s", a.GetName(), msg), todo)
	}
	if _, err := s.apps.SetDroplet(ctx, &basinv1.SetDropletRequest{Name: a.GetName(), DropletDigest: res.GetDropletDigest(), DetectedBuildpack: res.GetDetectedBuildpack(), StagedCommand: res.GetStartCommand()}); err != nil {
		return fmt.Errorf("record droplet of %s: %w", a.GetName(), err)
	}
	s.ui.Say("Staged with %s; start command: %s", orDash(res.GetDetectedBuildpack()), orDash(res.GetStartCommand()))
	return nil
}

// waitTask polls a task until it completes.
func waitTask(ctx context.Context, s *session, guid string, timeout time.Duration) (*basinv1.Task, error) {
	return pollTask(ctx, guid, timeout, func(ctx context.Context) (*basinv1.Task, error) {
		r, err := s.bbs.GetTask(ctx, &basinv1.GetTaskRequest{TaskGuid: guid})
		return r.GetTask(), err
	})
}

// pollTask calls get every 300 ms until it returns the task COMPLETED, fails,
// or timeout passes; a nil task is one not listed yet.
func pollTask(ctx context.Context, guid string, timeout time.Duration, get func(context.Context) (*basinv1.Task, error)) (*basinv1.Task, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	state := "unknown"
	for {
		t, err := get(ctx)
		if err != nil {
			return nil, fmt.Errorf("task %s: %w", guid, err)
		}
		if t.GetState() == basinv1.TaskState_TASK_STATE_COMPLETED {
			return t, nil
		}
		if t != nil {
			state = t.GetState().String()
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("task %s still %s after %s: %w", guid, state, timeout, ctx.Err())
		case <-time.After(300 * time.Millisecond):
		}
	}
}
