package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/basinpaas/basin/bbs"
)

// readTarget reads the target file `basin dev up` (or `basin login`) wrote.
func readTarget() (target, error) {
	p := targetPath()
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return target{}, fmt.Errorf("no basin installation targeted (%s does not exist): start one with `sudo basin dev up`, or set BASIN_HOME to the directory holding its target.json", p)
	}
	if err != nil {
		return target{}, fmt.Errorf("read target file: %w", err)
	}
	var t target
	if err := json.Unmarshal(b, &t); err != nil || t.API == "" {
		return target{}, fmt.Errorf("target file %s is not valid (want {\"api\": ..., \"token\": ...}): run `basin dev up` again", p)
	}
	return t, nil
}

// dialTarget connects to the targeted BBS with its token.
func dialTarget() (*bbs.Client, target, error) {
	t, err := readTarget()
	if err != nil {
		return nil, t, err
	}
	c, err := bbs.Dial(bbs.ClientConfig{Address: t.API, Token: t.Token, CAFile: t.CA})
	if err != nil {
		return nil, t, err
	}
	return c, t, nil
}

// apiError turns a gRPC error from the API into what a person can act on.
func apiError(t target, err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch st.Code() {
	case codes.Unavailable:
		return fmt.Errorf("cannot reach the basin API at %s (%s): is `basin dev up` still running?", t.API, st.Message())
	case codes.Unauthenticated:
		return fmt.Errorf("the basin API at %s refused the token in %s: run `basin dev up` (or `basin login`) again", t.API, targetPath())
	case codes.Canceled:
		return errors.New("interrupted")
	}
	return errors.New(st.Message())
}
