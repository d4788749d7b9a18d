package bbs

import (
	"context"
	"errors"
	"log/slog"

	"github.com/basinpaas/basin/bbs/blobstore"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// toStatus is the one place where domain errors become gRPC status codes.
// Errors that already carry a status (from interceptors) pass unchanged.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var code codes.Code
	switch {
	case errors.Is(err, ErrInvalid), errors.Is(err, blobstore.ErrDigestMismatch), errors.Is(err, blobstore.ErrBadDigest):
		code = codes.InvalidArgument
	case errors.Is(err, blobstore.ErrTooLarge):
		code = codes.ResourceExhausted
	case errors.Is(err, ErrNotFound), errors.Is(err, blobstore.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, ErrConflict):
		code = codes.Aborted
	case errors.Is(err, ErrTransition), errors.Is(err, ErrFenceLost), errors.Is(err, ErrNotRunning):
		code = codes.FailedPrecondition
	case errors.Is(err, ErrSlowSubscriber):
		code = codes.ResourceExhausted
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, rpctypes.ErrGRPCNoLeader), errors.Is(err, rpctypes.ErrNoLeader),
		errors.Is(err, rpctypes.ErrGRPCTimeout), errors.Is(err, rpctypes.ErrTimeout):
		code = codes.Unavailable
	default:
		code = codes.Internal
	}
	return status.Error(code, err.Error())
}

func unaryStatusInterceptor(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if err != nil {
			err = toStatus(err)
			if status.Code(err) == codes.Internal {
				log.Error("request failed", "method", info.FullMethod, "err", err)
			}
		}
		return resp, err
	}
}

func streamStatusInterceptor(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		err := handler(srv, ss)
		if err != nil {
			err = toStatus(err)
			if status.Code(err) == codes.Internal {
				log.Error("stream failed", "method", info.FullMethod, "err", err)
			}
		}
		return err
	}
}
