// Command basin-builder stages an app inside a staging container: it runs
// the buildpacks on the app's bits and writes the droplet and result.json,
// with Cloud Foundry's buildpackapplifecycle flags and exit codes (detect 222,
// compile 223, release 224, supply 225, finalize 226). It is built statically
// (CGO_ENABLED=0) with the standard library only, and runs as vcap.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/basinpaas/basin/buildpacks/lifecycle"
)

func main() {
	cfg := lifecycle.Config{Stdout: os.Stdout, Stderr: os.Stderr}
	fs := flag.NewFlagSet("basin-builder", flag.ExitOnError)
	fs.StringVar(&cfg.BuildDir, "buildDir", "/tmp/app", "the app's bits, writable")
	fs.StringVar(&cfg.BuildpacksDir, "buildpacksDir", "/tmp/buildpacks", "one subdirectory per buildpack key")
	order := fs.String("buildpackOrder", "", "comma-separated buildpack keys: the detection order, or the buildpacks to run with -skipDetect")
	fs.BoolVar(&cfg.SkipDetect, "skipDetect", false, "run every buildpack of -buildpackOrder (supply for all but the last) without detection")
	fs.StringVar(&cfg.CacheDir, "buildArtifactsCacheDir", "/tmp/cache", "build cache kept between stagings of the app")
	fs.StringVar(&cfg.OutputDroplet, "outputDroplet", "/tmp/droplet/droplet.tgz", "where to write the droplet")
	fs.StringVar(&cfg.OutputMetadata, "outputMetadata", "/tmp/droplet/result.json", "where to write result.json")
	_ = fs.Parse(os.Args[1:])
	for k := range strings.SplitSeq(*order, ",") {
		if k = strings.TrimSpace(k); k != "" {
			cfg.BuildpackOrder = append(cfg.BuildpackOrder, k)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if _, err := lifecycle.Stage(ctx, cfg); err != nil {
		fmt.Fprintf(os.Stderr, "basin-builder: %v\n", err)
		os.Exit(lifecycle.ExitCode(err))
	}
}
