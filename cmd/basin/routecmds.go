package main

import (
	"fmt"
	"strings"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func newRouteCommands() []*cobra.Command {
	var asJSON *bool
	routes := &cobra.Command{
		Use:     "routes",
		Short:   "List routes and the apps they are mapped to",
		Example: "  basin routes\n  basin routes --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			resp, err := s.apps.ListRoutes(cmd.Context(), &basinv1.ListRoutesRequest{})
			if err != nil {
				return fmt.Errorf("list routes: %w", err)
			}
			if *asJSON {
				var ms []proto.Message
				for _, r := range resp.GetRoutes() {
					ms = append(ms, r)
				}
				return s.ui.JSON(ms)
			}
			if len(resp.GetRoutes()) == 0 {
				s.ui.Say("No routes found.")
				return nil
			}
			var rows [][]string
			for _, b := range resp.GetRoutes() {
				host, domain, _ := strings.Cut(b.GetRoute().GetHost(), ".")
				rows = append(rows, []string{host, domain, b.GetRoute().GetPath(), strings.Join(b.GetApps(), ", ")})
			}
			s.ui.Table([]string{"host", "domain", "path", "apps"}, rows)
			return nil
		},
	}
	asJSON = jsonFlag(routes)
	return []*cobra.Command{routes, routeChange(true), routeChange(false), deleteRoute()}
}

// deleteRoute removes a route, unmapping it from every app it is mapped
// to, as cf's delete-route does; deleting a route that does not exist
// succeeds.
func deleteRoute() *cobra.Command {
	var hostname, path string
	var force bool
	c := &cobra.Command{
		Use:     "delete-route DOMAIN [--hostname HOST] [--path PATH] [-f]",
		Short:   "Delete a route: unmap it from every app it is mapped to",
		Example: "  basin delete-route apps.localhost --hostname www\n  basin delete-route example.com --path /api -f",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			host := args[0]
			if hostname != "" {
				host = hostname + "." + host
			}
			host = strings.ToLower(host)
			if !force && !confirm(cmd, fmt.Sprintf("Really delete the route %s? [yN]: ", host+path)) {
				s.ui.Say("Delete cancelled")
				return nil
			}
			s.ui.Say("Deleting route %s...", s.ui.Cyan(host+path))
			resp, err := s.apps.DeleteRoute(cmd.Context(), &basinv1.DeleteRouteRequest{Route: &basinv1.Route{Host: host, Path: path}})
			if status.Code(err) == codes.NotFound {
				s.ui.Say("Route %s does not exist.", s.ui.Cyan(host+path))
				s.ui.OK()
				return nil
			}
			if err != nil {
				return fmt.Errorf("delete-route %s: %w", host+path, err)
			}
			if apps := resp.GetApps(); len(apps) > 0 {
				s.ui.Say("Unmapped from %s.", strings.Join(apps, ", "))
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().StringVarP(&hostname, "hostname", "n", "", "host name before the domain")
	c.Flags().StringVar(&path, "path", "", "context path, e.g. /api")
	c.Flags().BoolVarP(&force, "force", "f", false, "do not ask for confirmation")
	return c
}

func routeChange(add bool) *cobra.Command {
	var hostname, path string
	use, short, verb := "map-route", "Map a route to an app: it is served by the app's instances at once", "Mapping"
	if !add {
		use, short, verb = "unmap-route", "Unmap a route from an app (the route stays, for other apps)", "Unmapping"
	}
	c := &cobra.Command{
		Use:     use + " NAME DOMAIN [--hostname HOST] [--path PATH]",
		Short:   short,
		Example: fmt.Sprintf("  basin %s myapp apps.localhost --hostname www\n  basin %s myapp example.com --path /api", use, use),
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := connect(cmd)
			if err != nil {
				return err
			}
			host := args[1]
			if hostname != "" {
				host = hostname + "." + host
			}
			r := &basinv1.Route{Host: strings.ToLower(host), Path: path}
			s.ui.Say("%s route %s %s app %s...", verb, s.ui.Cyan(host+path), map[bool]string{true: "to", false: "from"}[add], s.ui.Cyan(args[0]))
			if add {
				_, err = s.apps.MapRoute(cmd.Context(), &basinv1.MapRouteRequest{Name: args[0], Route: r})
			} else {
				_, err = s.apps.UnmapRoute(cmd.Context(), &basinv1.UnmapRouteRequest{Name: args[0], Route: r})
			}
			if err != nil {
				return fmt.Errorf("%s %s: %w", use, host+path, err)
			}
			s.ui.OK()
			return nil
		},
	}
	c.Flags().StringVarP(&hostname, "hostname", "n", "", "host name before the domain")
	c.Flags().StringVar(&path, "path", "", "context path, e.g. /api")
	return c
}
