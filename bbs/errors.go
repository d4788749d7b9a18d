package bbs

import (
	"errors"
	"fmt"
)

// The BBS's error vocabulary. Store methods wrap these with what failed on
// what; the gRPC edge (status.go) turns them into status codes in one place.
var (
	// ErrInvalid: the request is malformed. Always wrapped in a *FieldError.
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: the record does not exist.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: a record with that key exists.
	ErrAlreadyExists = errors.New("already exists")
	// ErrConflict: a concurrent write won; retrying with fresh state may succeed.
	ErrConflict = errors.New("concurrent modification")
	// ErrTransition: the state machine forbids the change (e.g. starting an
	// instance another cell claimed).
	ErrTransition = errors.New("invalid state transition")
	// ErrFenceLost: the caller's election or presence key is gone or was
	// re-created, so it may no longer write.
	ErrFenceLost = errors.New("fence lost")
	// ErrNotRunning: the instance exists but is not running (yet, or any
	// more), so nothing can be done in it.
	ErrNotRunning = errors.New("not running")
	// ErrSlowSubscriber: an events subscriber fell too far behind.
	ErrSlowSubscriber = errors.New("events subscriber too slow")
)

// FieldError names the request field that is wrong and why.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }
func (e *FieldError) Unwrap() error { return ErrInvalid }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}
