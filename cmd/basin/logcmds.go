package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// errNoLogService: the API does not serve the LogService yet.
var errNoLogService = errors.New("logs are not available on this installation (the LogService is not served)")

// formatLogLine prints a line as cf does: time [SOURCE/INDEX] OUT text.
func formatLogLine(l *basinv1.LogLine) string {
	stream := "OUT"
	if l.GetStream() == "stderr" {
		stream = "ERR"
	}
	src := l.GetSource()
	if src == "" {
		src = "APP"
	}
	if src == "APP" || src == "CELL" {
		src = fmt.Sprintf("%s/PROC/WEB/%d", src, l.GetIndex())
	}
	return fmt.Sprintf("%s [%s] %s %s", time.Unix(0, l.GetTimeUnixNano()).Format("2006-01-02T15:04:05.00-0700"), src, stream, strings.TrimRight(l.GetText(), "\n"))
}

// followLogs prints the stream's lines until it ends; quiet reports a
// missing LogService as one line rather than an error (staging goes on).
func followLogs(ctx context.Context, s *session, req *basinv1.StreamLogsRequest, quiet bool) error {
	stream, err := s.logs.StreamLogs(ctx, req)
	if err == nil {
		var l *basinv1.StreamLogsResponse
		for {
			l, err = stream.Recv()
			if err != nil {
				break
			}
			if quiet {
				fmt.Fprintf(s.ui.Out, "   %s\n", strings.TrimRight(l.GetLine().GetText(), "\n"))
			} else {
				fmt.Fprintln(s.ui.Out, formatLogLine(l.GetLine()))
			}
		}
	}
	switch {
	case err == nil, errors.Is(err, io.EOF), ctx.Err() != nil:
		return nil
	case status.Code(err) == codes.Unimplemented:
		if quiet {
			fmt.Fprintln(s.ui.Out, "   (the output is not shown: this installation does not serve the LogService)")
			return nil
		}
		return ui.WithHint(errNoLogService, "Upgrade the platform; meanwhile `basin events NAME` shows crashes with their last output.")
	default:
		if quiet {
			fmt.Fprintf(s.ui.Out, "   (output stream ended: %v)\n", err)
			return nil
		}
		return err
	}
}

func newLogsCommand() *cobra.Command {
	var recent bool
	var index int32
	c := &cobra.Command{
		Use:     "logs NAME [--recent]",
		Short:   "Show an app's logs: stream them, or dump the recent ones",
		Example: "  basin logs myapp --recent\n  basin logs myapp",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.GetApp(cmd.Context(), &basinv1.GetAppRequest{Name: args[0]})
			if err != nil {
				return fmt.Errorf("logs of %s: %w", args[0], err)
			}
			pgs := resp.GetApp().GetProcessGuids()
			if len(pgs) == 0 {
				return ui.WithHint(fmt.Errorf("logs of %s: the app is not running", args[0]), "Start it with `basin start "+args[0]+"`.")
			}
			if !recent {
				s.ui.Say("Retrieving logs for app %s...\n", s.ui.Cyan(args[0]))
			}
			pg := pgs[len(pgs)-1]
			req := &basinv1.StreamLogsRequest{Source: &basinv1.StreamLogsRequest_ProcessGuid{ProcessGuid: pg}, Follow: !recent}
			if cmd.Flags().Changed("index") {
				req.Index = &index
			}
			if err := followLogs(cmd.Context(), s, req, false); err != nil {
				return fmt.Errorf("logs of %s: %w", args[0], err)
			}
			return nil
		},
	}
	c.Flags().BoolVar(&recent, "recent", false, "dump the recent lines and exit")
	c.Flags().Int32VarP(&index, "index", "i", 0, "only this instance")
	return c
}
