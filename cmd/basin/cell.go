package main

import (
	"fmt"
	"time"

	"github.com/basinpaas/basin/cell"
	"github.com/spf13/cobra"
)

func newCellCommand() *cobra.Command {
	c := &cobra.Command{Use: "cell", Short: "Operate on cells"}
	var t cell.DrainTarget
	var timeout time.Duration
	drain := &cobra.Command{
		Use:   "drain",
		Short: "Evacuate a cell: its instances are placed elsewhere, then stopped there",
		Long: `Ask a cell to evacuate: it stops taking work, has its instances placed on
other cells, waits (up to --timeout) until the replacements run, then stops
its own. The cell keeps running, empty, until it is restarted.`,
		Example: "  basin cell drain --rep 127.0.0.1:1800\n  basin cell drain --rep cell-3:1800 --ca ca.pem --cert op.pem --key op-key.pem",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			start := time.Now()
			if err := cell.Drain(cmd.Context(), t, timeout); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cell at %s drained in %s\n", t.Address, time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	drain.Flags().StringVar(&t.Address, "rep", "", "the cell's rep gRPC address (basin cells lists them)")
	drain.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long the cell waits for replacements")
	drain.Flags().StringVar(&t.CAFile, "ca", "", "CA verifying the cell (TLS when set)")
	drain.Flags().StringVar(&t.CertFile, "cert", "", "client certificate")
	drain.Flags().StringVar(&t.KeyFile, "key", "", "client key")
	drain.MarkFlagRequired("rep")
	c.AddCommand(drain)
	return c
}
