package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

// exitCode makes basin exit with a status without printing anything more
// (the remote command's own status, for `basin ssh -c`).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func newSSHCommand() *cobra.Command {
	var (
		index           int32
		command         string
		forceTTY, noTTY bool
	)
	c := &cobra.Command{
		Use:   "ssh NAME",
		Short: "Open a shell, or run one command, inside an app instance's container",
		Long: `Open an interactive shell inside an instance of the app NAME, as the user
vcap in /home/vcap/app, with the app's environment ($PORT, VCAP_APPLICATION,
...). With -c, run one command through /bin/sh instead, stream its output and
exit with its exit status.

The session goes through the basin API: it needs no access to the cells.
Leaving the shell (exit or Ctrl-D) ends it; the remote process is killed if
the connection drops.`,
		Example: `  basin ssh myapp                     # a shell in instance 0
  basin ssh myapp -i 2                # a shell in instance 2
  basin ssh myapp -c 'echo $PORT'     # one command; basin exits with its status
  tar cz src | basin ssh myapp -c 'tar xz -C /home/vcap/tmp'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if index < 0 {
				return fmt.Errorf("-i: the instance index must be 0 or more, got %d", index)
			}
			if forceTTY && noTTY {
				return errors.New("-t and -T: choose one")
			}
			stdin, _ := cmd.InOrStdin().(*os.File)
			tty := command == ""
			if forceTTY {
				tty = true
			}
			if noTTY || stdin == nil || !isTerminal(int(stdin.Fd())) {
				tty = false
			}
			sess, err := connect(cmd)
			if err != nil {
				return err
			}
			return runSSH(cmd.Context(), sess, sshOptions{name: args[0], index: index, command: command, tty: tty,
				stdin: cmd.InOrStdin(), stdout: cmd.OutOrStdout(), stderr: cmd.ErrOrStderr(), term: stdin})
		},
	}
	c.Flags().Int32VarP(&index, "index", "i", 0, "the instance's index")
	c.Flags().StringVarP(&command, "command", "c", "", "run this command (through /bin/sh -c) instead of a shell")
	c.Flags().BoolVarP(&forceTTY, "force-tty", "t", false, "allocate a terminal even with -c (when basin's input is a terminal)")
	c.Flags().BoolVarP(&noTTY, "disable-tty", "T", false, "never allocate a terminal")
	return c
}

type sshOptions struct {
	name           string
	index          int32
	command        string
	tty            bool
	stdin          io.Reader
	stdout, stderr io.Writer
	term           *os.File // the local terminal when tty
}

func runSSH(ctx context.Context, s *session, o sshOptions) error {
	guid, err := resolveProcessGUID(ctx, s.apps, o.name)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.bbs.SSH.Exec(ctx)
	if err != nil {
		return sshError(o, err)
	}
	var sendMu sync.Mutex
	send := func(r *basinv1.ExecRequest) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(&basinv1.SSHServiceExecRequest{Request: r})
	}
	start := &basinv1.ExecStart{ProcessGuid: guid, Index: o.index, Tty: o.tty}
	if o.command != "" {
		start.Command = []string{"/bin/sh", "-c", o.command}
	}
	if o.tty {
		rows, cols := terminalSize(int(o.term.Fd()))
		start.Size = &basinv1.TerminalSize{Rows: rows, Cols: cols}
	}
	if err := send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Start{Start: start}}); err != nil {
		_, err = stream.Recv() // the server's reason
		return sshError(o, err)
	}
	if o.tty {
		restore, err := makeRaw(int(o.term.Fd()))
		if err != nil {
			return err
		}
		defer restore()
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-winch:
				}
				rows, cols := terminalSize(int(o.term.Fd()))
				_ = send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Resize{Resize: &basinv1.TerminalSize{Rows: rows, Cols: cols}}})
			}
		}()
	}
	// Stdin: this goroutine may stay blocked in Read after the session;
	// basin exits right after.
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := o.stdin.Read(buf)
			if n > 0 {
				if send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_Stdin{Stdin: append([]byte(nil), buf[:n]...)}}) != nil {
					return
				}
			}
			if err != nil {
				_ = send(&basinv1.ExecRequest{Msg: &basinv1.ExecRequest_StdinClose{StdinClose: true}})
				return
			}
		}
	}()
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return errors.New("the session ended without the command's exit status (the cell may have gone)")
		}
		if err != nil {
			return sshError(o, err)
		}
		switch r := m.GetResponse().GetMsg().(type) {
		case *basinv1.ExecResponse_Stdout:
			if _, err := o.stdout.Write(r.Stdout); err != nil {
				return err
			}
		case *basinv1.ExecResponse_Stderr:
			if _, err := o.stderr.Write(r.Stderr); err != nil {
				return err
			}
		case *basinv1.ExecResponse_Exit:
			if code := r.Exit.GetCode(); code != 0 {
				return exitCode(code)
			}
			return nil
		}
	}
}

func sshError(o sshOptions, err error) error {
	return fmt.Errorf("ssh to instance %d of %s: %w", o.index, o.name, err)
}

// resolveProcessGUID finds the app's current LRP through the app layer.
func resolveProcessGUID(ctx context.Context, apps interface {
	GetApp(ctx context.Context, in *basinv1.GetAppRequest, opts ...grpc.CallOption) (*basinv1.GetAppResponse, error)
}, name string) (string, error) {
	resp, err := apps.GetApp(ctx, &basinv1.GetAppRequest{Name: name})
	if err != nil {
		return "", err
	}
	guids := resp.GetApp().GetProcessGuids()
	if len(guids) == 0 {
		return "", ui.WithHint(fmt.Errorf("app %s is not running", name), fmt.Sprintf("Start it with `basin start %s`.", name))
	}
	return guids[len(guids)-1], nil
}
