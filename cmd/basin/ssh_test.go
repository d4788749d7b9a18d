package main

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/basinpaas/basin/cmd/basin/internal/ui"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
)

type sshApps map[string][]string

func (f sshApps) GetApp(_ context.Context, in *basinv1.GetAppRequest, _ ...grpc.CallOption) (*basinv1.GetAppResponse, error) {
	guids, ok := f[in.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "app %s not found", in.GetName())
	}
	return &basinv1.GetAppResponse{App: &basinv1.App{Name: in.GetName(), ProcessGuids: guids}}, nil
}

func TestResolveProcessGUID(t *testing.T) {
	apps := sshApps{"web": {"g1-v1"}, "rolling": {"g2-v3", "g2-v4"}, "stopped": nil}
	tests := []struct {
		name, want, err string
	}{
		{name: "web", want: "g1-v1"},
		{name: "rolling", want: "g2-v4"},
		{name: "stopped", err: "not running"},
		{name: "nope", err: "app nope not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := resolveProcessGUID(context.Background(), apps, tt.name)
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
	if err == nil || !strings.Contains(ui.Explain(err, ""), "basin dev up") {
		t.Errorf("err %v: want a hint to start basin", err)
	}
}
