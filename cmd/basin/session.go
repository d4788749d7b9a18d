package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/basinpaas/basin/bbs"
	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
)

// session is a connection to the targeted basin: the BBS and the services
// its process serves beside it.
type session struct {
	target  target
	bbs     *bbs.Client
	apps    basinv1.AppServiceClient
	staging basinv1.StagingServiceClient
	logs    basinv1.LogServiceClient
	ui      *ui.UI
}

func readTarget() (target, error) {
	var t target
	b, err := os.ReadFile(targetPath())
	if errors.Is(err, os.ErrNotExist) {
		return t, ui.WithHint(fmt.Errorf("no API targeted (%s does not exist)", targetPath()),
			"Start a platform with `sudo basin dev up`, or point at one with `basin login --api HOST:PORT --token TOKEN`.")
	}
	if err != nil {
		return t, fmt.Errorf("read target file: %w", err)
	}
	if err := json.Unmarshal(b, &t); err != nil || t.API == "" {
		return t, ui.WithHint(fmt.Errorf("target file %s is damaged", targetPath()), "Run `basin login` again.")
	}
	return t, nil
}

// connect opens a session on the targeted API.
func connect(cmd *cobra.Command) (*session, error) {
	t, err := readTarget()
	if err != nil {
		return nil, err
	}
	cli, err := bbs.Dial(bbs.ClientConfig{Address: t.API, Token: t.Token, CAFile: t.CA})
	if err != nil {
		return nil, err
	}
	cmd.PostRunE = func(*cobra.Command, []string) error { return cli.Close() }
	conn := cli.Conn()
	apiAddress = t.API
	return &session{
		target:  t,
		bbs:     cli,
		apps:    basinv1.NewAppServiceClient(conn),
		staging: basinv1.NewStagingServiceClient(conn),
		logs:    basinv1.NewLogServiceClient(conn),
		ui:      ui.New(cmd.OutOrStdout(), cmd.ErrOrStderr()),
	}, nil
}

// apiAddress is the API the command talked to, for error advice.
var apiAddress string

// jsonFlag adds --json to a read command.
func jsonFlag(c *cobra.Command) *bool {
	return c.Flags().Bool("json", false, "print JSON for scripts instead of a table")
}
