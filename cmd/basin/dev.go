package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/basinpaas/basin/apps"
	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/bbs/blobstore"
	"github.com/basinpaas/basin/bbs/embeddedetcd"
	"github.com/basinpaas/basin/buildpacks"
	"github.com/basinpaas/basin/gorouter"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
)

type devUpOptions struct {
	dir        string
	apiAddress string
	etcdAddr   string
	debugAddr  string
	routerAddr string
	domain     string
	cells      int
	netID      int
	verbose    bool
	stacks     []string
}

func newDevCommand() *cobra.Command {
	dev := &cobra.Command{
		Use:   "dev",
		Short: "Run a basin platform on this machine for development",
	}
	var o devUpOptions
	up := &cobra.Command{
		Use:   "up",
		Short: "Start the whole platform on this machine, in the foreground",
		Long: `Start the whole platform on this machine: an embedded etcd, the BBS with its
blobstore, the router, the auctioneer, the converger, containerd (Debian's,
started by basin when no system one runs) and N cells, and keep them running
until Ctrl-C. Missing Debian packages are installed first (as root). The API address and a bearer token are printed and written to
the target file that the other basin commands read.`,
		Example: "  sudo basin dev up\n  basin dev up --dir /tmp/basin --api 127.0.0.1:9000",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return devUp(cmd.Context(), cmd.OutOrStdout(), o)
		},
	}
	up.Flags().StringVar(&o.dir, "dir", defaultDevDir(), "where the platform keeps its state")
	up.Flags().StringVar(&o.apiAddress, "api", "127.0.0.1:8889", "address of the BBS gRPC API")
	up.Flags().StringVar(&o.etcdAddr, "etcd", "127.0.0.1:2379", "client address of the embedded etcd")
	up.Flags().StringVar(&o.debugAddr, "debug", "127.0.0.1:17017", "address of /metrics")
	up.Flags().StringVar(&o.routerAddr, "router", "127.0.0.1:8080", "address of the HTTP router apps are reached through")
	up.Flags().StringVar(&o.domain, "domain", "apps.localhost", "default app domain: app NAME answers at NAME.<domain>")
	up.Flags().IntVar(&o.cells, "cells", 2, "how many cells (each with its own network) to run; 0 runs none")
	up.Flags().IntVar(&o.netID, "net-id", 0, "1-12 gives the cells bridges basin-dN-I, subnets 10.(214+N).I.0/24 and host ports of their own, so two platforms share a machine")
	up.Flags().StringSliceVar(&o.stacks, "stacks", []string{"tiny", "bookworm"}, "stacks the cells run (tiny: busybox, for tests; bookworm: Debian with the buildpacks' runtimes)")
	up.Flags().BoolVarP(&o.verbose, "verbose", "v", false, "log every component's messages")
	dev.AddCommand(up, newDevDownCommand())
	return dev
}

func defaultDevDir() string {
	if d := os.Getenv("BASIN_HOME"); d != "" {
		return filepath.Join(d, "dev")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ".basin/dev"
	}
	return filepath.Join(home, ".basin", "dev")
}

// target is what `basin dev up` (or `basin login`) leaves for the other commands.
type target struct {
	API   string `json:"api"`
	Token string `json:"token"`
	CA    string `json:"ca,omitempty"`
	// Domain and Router are what dev up serves apps on, for display.
	Domain string `json:"domain,omitempty"`
	Router string `json:"router,omitempty"`
}

func targetPath() string {
	if d := os.Getenv("BASIN_HOME"); d != "" {
		return filepath.Join(d, "target.json")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(".basin", "target.json")
	}
	return filepath.Join(home, ".basin", "target.json")
}

func writeTarget(t target) (string, error) {
	p := targetPath()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return "", fmt.Errorf("create %s: %w", filepath.Dir(p), err)
	}
	b, _ := json.MarshalIndent(t, "", "  ")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return "", fmt.Errorf("write target file: %w", err)
	}
	return p, os.Rename(tmp, p)
}

// devToken reuses the token of an earlier run so existing targets keep working.
func devToken(dir string) (string, error) {
	p := filepath.Join(dir, "token")
	if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	buf := make([]byte, 24)
	if _, err := rand.Read(buf); err != nil {
		return "", err
	}
	tok := hex.EncodeToString(buf)
	if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write token: %w", err)
	}
	return tok, nil
}

func devUp(ctx context.Context, out io.Writer, o devUpOptions) error {
	step := func(format string, args ...any) { fmt.Fprintf(out, "  ✓ "+format+"\n", args...) }
	logLevel := slog.LevelWarn
	if o.verbose {
		logLevel = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))

	if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", o.dir, err)
	}
	if pid := runningPID(o.dir); pid != 0 {
		return fmt.Errorf("basin dev up is already running on %s (pid %d)", o.dir, pid)
	}
	if err := writePID(o.dir); err != nil {
		return err
	}
	defer os.Remove(filepath.Join(o.dir, pidFile))
	if o.netID < 0 || o.netID > 12 {
		return fmt.Errorf("--net-id %d: must be between 0 and 12", o.netID)
	}
	if o.netID > 0 && o.cells > 10 {
		return fmt.Errorf("--cells %d: at most 10 with --net-id", o.cells)
	}
	if err := os.WriteFile(filepath.Join(o.dir, netIDFile), []byte(strconv.Itoa(o.netID)+"\n"), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", netIDFile, err)
	}
	token, err := devToken(o.dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "Starting basin in %s\n", o.dir)
	if err := ensurePackages(ctx, out, debianPackages); err != nil {
		return err
	}
	step("Debian packages: %s", strings.Join(debianPackages, ", "))

	etcd, err := embeddedetcd.Start(ctx, embeddedetcd.Config{Dir: filepath.Join(o.dir, "etcd"), ClientAddress: o.etcdAddr, Logger: log})
	if err != nil {
		return fmt.Errorf("start etcd (is another basin running? --etcd picks another address): %w", err)
	}
	defer etcd.Close()
	step("etcd          %s", etcd.Endpoint())
	cli, err := etcd.Client()
	if err != nil {
		return err
	}
	defer cli.Close()

	blobs, err := blobstore.NewLocal(filepath.Join(o.dir, "blobs"))
	if err != nil {
		return err
	}
	srv, err := bbs.NewServer(cli, bbs.Config{ListenAddress: o.apiAddress, DebugAddress: o.debugAddr, Token: token, Blobs: blobs,
		BuiltinBuildpacks: buildpacks.Builtin, Logger: log, Store: bbs.StoreConfig{MaxTxnOps: embeddedetcd.MaxTxnOps}})
	if err != nil {
		return fmt.Errorf("start BBS (--api picks another address): %w", err)
	}
	step("BBS API       %s (metrics on http://%s/metrics)", srv.Addr(), o.debugAddr)
	appLayer := apps.Serve(srv, cli, apps.Config{Domain: o.domain, DefaultStack: defaultStack(o.stacks), Logger: log.With("component", "apps")})

	router, err := gorouter.New(gorouter.Config{Addr: o.routerAddr, DefaultDomain: o.domain}, cli, log.With("component", "router"))
	if err != nil {
		return fmt.Errorf("start router (--router picks another address): %w", err)
	}
	step("router        http://%s (apps at NAME.%s)", router.Addr(), o.domain)

	bbsClient, err := bbs.Dial(bbs.ClientConfig{Address: srv.Addr(), Token: token})
	if err != nil {
		return err
	}
	defer bbsClient.Close()
	plat, err := startPlatform(ctx, platformConfig{
		dir:       o.dir,
		cells:     o.cells,
		netID:     o.netID,
		stacks:    o.stacks,
		bbsClient: bbsClient,
		etcd:      cli,
		protected: []int{portOf(etcd.Endpoint()[len("http://"):]), portOf(srv.Addr()), portOf(o.debugAddr)},
		log:       log,
		step:      step,
		out:       out,
	})
	if err != nil {
		return err
	}
	defer plat.stop()

	tp, err := writeTarget(target{API: srv.Addr(), Token: token})
	if err != nil {
		return err
	}
	step("target        %s", tp)
	fmt.Fprintf(out, `
basin is up. Ctrl-C stops it.

  API:    %s
  token:  %s
  router: http://%s   domain: %s

Try it with grpcurl:
  grpcurl -plaintext %s list
  grpcurl -plaintext -H 'authorization: Bearer %s' %s basin.v1.BBSService/ListActualLRPs
  curl -H 'Host: myapp.%s' http://%s/
`, srv.Addr(), token, router.Addr(), o.domain, srv.Addr(), token, srv.Addr(), o.domain, router.Addr())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Run(gctx) })
	g.Go(func() error { return appLayer.Run(gctx) })
	g.Go(func() error { return router.Run(gctx) })
	plat.run(gctx, g)
	g.Go(func() error {
		select {
		case err := <-etcd.Err():
			return fmt.Errorf("etcd stopped: %w", err)
		case <-gctx.Done():
			return nil
		}
	})
	err = g.Wait()
	fmt.Fprintln(out, "\nbasin stopped.")
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// defaultStack is what apps run on unless they say: bookworm (Cloud
// Foundry's cflinuxfs, with the buildpacks' runtimes) when the cells offer
// it, else the first stack they run.
func defaultStack(stacks []string) string {
	if slices.Contains(stacks, "bookworm") || len(stacks) == 0 {
		return "bookworm"
	}
	return stacks[0]
}
