package ui

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Hint is an error with advice on what to do about it.
type Hint struct {
	Err  error
	Todo string
}

func (h *Hint) Error() string { return h.Err.Error() }
func (h *Hint) Unwrap() error { return h.Err }

// WithHint attaches advice to err.
func WithHint(err error, todo string) error {
	if err == nil {
		return nil
	}
	return &Hint{Err: err, Todo: todo}
}

// Explain is the one place where errors from the API become messages for
// people: what failed (the wrapping the commands add), why (the server's
// reason, without gRPC's "rpc error: code = ..." noise) and what to do.
// api is the address the CLI talked to.
func Explain(err error, api string) string {
	if err == nil {
		return ""
	}
	var todo string
	var h *Hint
	if errors.As(err, &h) {
		todo = h.Todo
	}
	msg := err.Error()
	if st, ok := findStatus(err); ok {
		// Replace gRPC's rendering of the status by its message.
		msg = strings.Replace(msg, fmt.Sprintf("rpc error: code = %s desc = ", st.Code()), "", 1)
		if todo == "" {
			todo = adviceFor(st, api)
		}
	} else if errors.Is(err, context.DeadlineExceeded) && todo == "" {
		todo = "it took too long; run the command again, or look at `basin app NAME` and `basin events NAME` for what is slow"
	}
	if todo == "" {
		return msg
	}
	return msg + "\n" + todo
}

func findStatus(err error) (*status.Status, bool) {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if st, ok := status.FromError(e); ok && st.Code() != codes.OK && st.Code() != codes.Unknown {
			return st, true
		}
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range j.Unwrap() {
				if st, ok := findStatus(x); ok {
					return st, true
				}
			}
			return nil, false
		}
	}
	return nil, false
}

func adviceFor(st *status.Status, api string) string {
	switch st.Code() {
	case codes.Unavailable:
		return fmt.Sprintf("The basin API at %s does not answer: is the platform running (`sudo basin dev up`), and is `basin target` right?", api)
	case codes.Unauthenticated, codes.PermissionDenied:
		return "The API refused the credentials: run `basin login` with the platform's token (dev up prints it)."
	case codes.NotFound:
		return "Check the name with `basin apps`."
	case codes.AlreadyExists:
		return "Pick another name, or change the existing one."
	case codes.InvalidArgument:
		return "Fix the value named above and try again; `basin help COMMAND` shows the flags."
	case codes.FailedPrecondition:
		return "The app is not in a state that allows this; `basin app NAME` shows its state."
	case codes.Aborted:
		return "Someone changed it at the same time: run the command again."
	case codes.Unimplemented:
		return "This basin installation does not serve that yet (the service is missing on the API server)."
	case codes.ResourceExhausted:
		return "A limit was reached; make it smaller or ask the operator for more."
	case codes.DeadlineExceeded:
		return "The API took too long; try again."
	}
	return ""
}
