package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
)

func newTargetCommands() []*cobra.Command {
	var asJSON *bool
	tgt := &cobra.Command{
		Use:     "target",
		Short:   "Show the basin API the other commands talk to",
		Long:    "Show the targeted API, read from " + "$BASIN_HOME/target.json (~/.basin/target.json); `basin login` or `basin dev up` writes it.",
		Example: "  basin target\n  basin target --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, err := readTarget()
			if err != nil {
				return err
			}
			u := ui.New(cmd.OutOrStdout(), cmd.ErrOrStderr())
			if *asJSON {
				t.Token = redact(t.Token)
				return u.JSON(t)
			}
			rows := [][2]string{{"API endpoint", t.API}, {"token", redact(t.Token)}, {"target file", targetPath()}}
			if t.CA != "" {
				rows = append(rows, [2]string{"CA", t.CA})
			}
			if t.Domain != "" {
				rows = append(rows, [2]string{"app domain", t.Domain})
			}
			if t.Router != "" {
				rows = append(rows, [2]string{"router", t.Router})
			}
			u.KeyValues(rows)
			return nil
		},
	}
	asJSON = jsonFlag(tgt)

	var t target
	var tokenFile string
	var skipCheck bool
	login := &cobra.Command{
		Use:   "login",
		Short: "Point basin at an installation: API address, CA and token",
		Long: `Save the API address, the CA that signed its certificate (TLS when given)
and the bearer token to the target file, after checking that the API answers
with them.`,
		Example: "  basin login --api 10.0.0.5:8889 --ca ca.pem --token-file token\n  basin login --api 127.0.0.1:8889 --token 0123abcd",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return fmt.Errorf("read token file: %w", err)
				}
				t.Token = string(trimSpace(b))
			}
			if t.Token == "" {
				t.Token = os.Getenv("BASIN_TOKEN")
			}
			if !skipCheck {
				apiAddress = t.API
				cli, err := bbs.Dial(bbs.ClientConfig{Address: t.API, Token: t.Token, CAFile: t.CA})
				if err != nil {
					return err
				}
				defer cli.Close()
				ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
				defer cancel()
				info, err := basinv1.NewAppServiceClient(cli.Conn()).GetInfo(ctx, &basinv1.GetInfoRequest{})
				if err != nil {
					return fmt.Errorf("log in to %s: %w", t.API, err)
				}
				t.Domain = info.GetDomain()
			}
			p, err := writeTarget(t)
			if err != nil {
				return err
			}
			u := ui.New(cmd.OutOrStdout(), cmd.ErrOrStderr())
			u.Say("Targeted %s (saved in %s)", u.Cyan(t.API), p)
			u.OK()
			return nil
		},
	}
	login.Flags().StringVarP(&t.API, "api", "a", "", "API address, HOST:PORT")
	login.Flags().StringVar(&t.CA, "ca", "", "CA certificate file that verifies the API (TLS when set)")
	login.Flags().StringVar(&t.Token, "token", "", "bearer token (or BASIN_TOKEN, or --token-file)")
	login.Flags().StringVar(&tokenFile, "token-file", "", "file holding the bearer token")
	login.Flags().BoolVar(&skipCheck, "skip-check", false, "save without checking that the API answers")
	login.MarkFlagRequired("api")
	return []*cobra.Command{tgt, login}
}

func redact(tok string) string {
	if len(tok) <= 8 {
		return "****"
	}
	return tok[:4] + "…" + tok[len(tok)-4:]
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
