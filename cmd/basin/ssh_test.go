package main

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc"

	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

type fakeLister []*basinv1.DesiredLRP

func (f fakeLister) ListDesiredLRPs(context.Context, *basinv1.ListDesiredLRPsRequest, ...grpc.CallOption) (*basinv1.ListDesiredLRPsResponse, error) {
	return &basinv1.ListDesiredLRPsResponse{DesiredLrps: f}, nil
}

func lrp(guid, app string) *basinv1.DesiredLRP {
	return &basinv1.DesiredLRP{Schedule: &basinv1.DesiredLRPSchedule{ProcessGuid: guid}, Run: &basinv1.DesiredLRPRun{AppName: app}}
}

func TestResolveProcessGUID(t *testing.T) {
	l := fakeLister{lrp("web-1", "web"), lrp("worker-1", "worker"), lrp("dup-1", "dup"), lrp("dup-2", "dup"), lrp("raw", "")}
	tests := []struct {
		name, want, err string
	}{
		{name: "web", want: "web-1"},
		{name: "worker-1", want: "worker-1"},
		{name: "raw", want: "raw"},
		{name: "nope", err: `app "nope" not found`},
		{name: "dup", err: "several processes are named"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := resolveProcessGUID(context.Background(), l, tt.name)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Errorf("err %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("= %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestSSHWithoutTargetSaysWhatToDo(t *testing.T) {
	t.Setenv("BASIN_HOME", t.TempDir())
	cmd := newRootCommand()
	cmd.SetArgs([]string{"ssh", "web", "-c", "true"})
	err := cmd.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "basin dev up") {
		t.Errorf("err %v: want a hint to start basin", err)
	}
}
