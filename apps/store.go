// Package apps is basin's app layer, what Cloud Foundry's Cloud Controller is
// to Diego: apps with a requested state, settings, routes, env and a history,
// each running as one desired LRP per version on the BBS's primitives. It is
// a concept of its own above the BBS (which knows only LRPs and tasks), so it
// lives beside bbs/ rather than in it, and reaches the BBS only through the
// BBSService's methods; it is served by the BBS process on the same gRPC
// server.
//
// etcd keys (under the BBS prefix, values protobuf):
//
//	apps/<name>                        App
//	appguids/<guid>                    the app's name (so a crash finds its app)
//	appevents/<guid>/<nanos>-<kind>    AppEvent, the last MaxEvents kept
//	apptasks/<guid>/<nanos>-<task>     Task, completed and resolved: the last
//	                                   MaxEvents kept, for tasks and run-task --wait
//	approutes/<host><escaped path>     RouteBinding
package apps

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"github.com/basinpaas/basin/bbs"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// keys is the app layer's key layout under the BBS prefix.
type keys struct{ prefix string }

func (k keys) appPrefix() string             { return k.prefix + "apps/" }
func (k keys) app(name string) string        { return k.prefix + "apps/" + name }
func (k keys) guid(guid string) string       { return k.prefix + "appguids/" + guid }
func (k keys) events(guid string) string     { return k.prefix + "appevents/" + guid + "/" }
func (k keys) tasks(guid string) string      { return k.prefix + "apptasks/" + guid + "/" }
func (k keys) routePrefix() string           { return k.prefix + "approutes/" }
func (k keys) route(r *basinv1.Route) string { return k.prefix + "approutes/" + routeID(r) }

// event keys sort by time: 19 digits hold nanoseconds until 2286.
func (k keys) event(guid string, nanos int64, kind string) string {
	return fmt.Sprintf("%s%019d-%s", k.events(guid), nanos, kind)
}

// routeID is a route's host and escaped path, as cf prints it.
func routeID(r *basinv1.Route) string {
	if r.GetPath() == "" || r.GetPath() == "/" {
		return r.GetHost()
	}
	return r.GetHost() + url.PathEscape(r.GetPath())
}

// RouteString is host/path.
func RouteString(r *basinv1.Route) string { return r.GetHost() + r.GetPath() }

const maxAttempts = 4

func marshal(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(fmt.Sprintf("marshal %T: %v", m, err))
	}
	return b
}

// get reads an app and its mod revision.
func (s *Service) get(ctx context.Context, name string) (*basinv1.App, error) {
	resp, err := s.etcd.Get(ctx, s.keys.app(name))
	if err != nil {
		return nil, fmt.Errorf("read app %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("app %s: %w", name, bbs.ErrNotFound)
	}
	a := &basinv1.App{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, a); err != nil {
		return nil, fmt.Errorf("decode app %s: %w", name, err)
	}
	a.Revision = resp.Kvs[0].ModRevision
	return a, nil
}

// mutate applies fn to the app in one transaction guarded by its mod
// revision, retrying with fresh state when a concurrent write won (unless
// ifRev pins the revision).
func (s *Service) mutate(ctx context.Context, name string, ifRev int64, fn func(a *basinv1.App) error) (*basinv1.App, error) {
	for range maxAttempts {
		a, err := s.get(ctx, name)
		if err != nil {
			return nil, err
		}
		rev := a.Revision
		if ifRev != 0 && ifRev != rev {
			return nil, fmt.Errorf("update app %s: %w: revision is %d, not %d", name, bbs.ErrConflict, rev, ifRev)
		}
		if err := fn(a); err != nil {
			return nil, err
		}
		a.Revision = 0
		a.UpdatedAtUnixNano = s.now().UnixNano()
		k := s.keys.app(name)
		resp, err := s.etcd.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
			Then(clientv3.OpPut(k, string(marshal(a)))).Commit()
		if err != nil {
			return nil, fmt.Errorf("write app %s: %w", name, err)
		}
		if resp.Succeeded {
			a.Revision = resp.Header.Revision
			return a, nil
		}
		if ifRev != 0 {
			return nil, fmt.Errorf("update app %s: %w", name, bbs.ErrConflict)
		}
	}
	return nil, fmt.Errorf("update app %s: %w after %d attempts", name, bbs.ErrConflict, maxAttempts)
}

// create stores a new app and its guid index in one transaction.
func (s *Service) create(ctx context.Context, a *basinv1.App) (*basinv1.App, error) {
	k, gk := s.keys.app(a.GetName()), s.keys.guid(a.GetGuid())
	resp, err := s.etcd.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, string(marshal(a))), clientv3.OpPut(gk, a.GetName())).Commit()
	if err != nil {
		return nil, fmt.Errorf("create app %s: %w", a.GetName(), err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("app %s: %w", a.GetName(), bbs.ErrAlreadyExists)
	}
	a.Revision = resp.Header.Revision
	return a, nil
}

func (s *Service) list(ctx context.Context) ([]*basinv1.App, error) {
	resp, err := s.etcd.Get(ctx, s.keys.appPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list apps: %w", err)
	}
	out := make([]*basinv1.App, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		a := &basinv1.App{}
		if proto.Unmarshal(kv.Value, a) != nil {
			s.log.Warn("undecodable app record", "key", string(kv.Key))
			continue
		}
		a.Revision = kv.ModRevision
		out = append(out, a)
	}
	return out, nil
}

// remove deletes the app, its guid index, its events and its task history,
// only while the app is still the record read at rev.
func (s *Service) remove(ctx context.Context, a *basinv1.App) error {
	k := s.keys.app(a.GetName())
	resp, err := s.etcd.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", a.GetRevision())).
		Then(clientv3.OpDelete(k), clientv3.OpDelete(s.keys.guid(a.GetGuid())),
			clientv3.OpDelete(s.keys.events(a.GetGuid()), clientv3.WithPrefix()),
			clientv3.OpDelete(s.keys.tasks(a.GetGuid()), clientv3.WithPrefix())).Commit()
	if err != nil {
		return fmt.Errorf("delete app %s: %w", a.GetName(), err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("delete app %s: %w", a.GetName(), bbs.ErrConflict)
	}
	return nil
}

// record appends an event to the app's history, only while the app exists,
// and only once per key (replicas recording the same crash write one key);
// then trims the history to MaxEvents.
func (s *Service) record(ctx context.Context, guid string, key string, ev *basinv1.AppEvent) error {
	resp, err := s.etcd.Txn(ctx).If(
		clientv3.Compare(clientv3.CreateRevision(s.keys.guid(guid)), ">", 0),
		clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
	).Then(clientv3.OpPut(key, string(marshal(ev)))).Commit()
	if err != nil {
		return fmt.Errorf("record %s event of app %s: %w", ev.GetType(), guid, err)
	}
	if !resp.Succeeded {
		return nil
	}
	return s.trim(ctx, s.keys.events(guid))
}

// trim deletes the oldest keys under prefix beyond MaxEvents.
func (s *Service) trim(ctx context.Context, prefix string) error {
	resp, err := s.etcd.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	extra := len(resp.Kvs) - s.cfg.MaxEvents
	if extra <= 0 {
		return nil
	}
	var ops []clientv3.Op
	for _, kv := range resp.Kvs[:extra] {
		ops = append(ops, clientv3.OpDelete(string(kv.Key)))
		if len(ops) == 100 {
			if _, err := s.etcd.Txn(ctx).Then(ops...).Commit(); err != nil {
				return fmt.Errorf("trim %s: %w", prefix, err)
			}
			ops = ops[:0]
		}
	}
	if len(ops) > 0 {
		if _, err := s.etcd.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("trim %s: %w", prefix, err)
		}
	}
	return nil
}

// keepTask adds a completed task to its app's history, only while the app
// exists and only once (replicas see the same completion), then trims the
// history.
func (s *Service) keepTask(ctx context.Context, guid string, t *basinv1.Task) error {
	key := fmt.Sprintf("%s%019d-%s", s.keys.tasks(guid), t.GetCreatedAtUnixNano(), t.GetTaskGuid())
	resp, err := s.etcd.Txn(ctx).If(
		clientv3.Compare(clientv3.CreateRevision(s.keys.guid(guid)), ">", 0),
		clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
	).Then(clientv3.OpPut(key, string(marshal(t)))).Commit()
	if err != nil {
		return fmt.Errorf("keep task %s of app %s: %w", t.GetTaskGuid(), guid, err)
	}
	if !resp.Succeeded {
		return nil
	}
	return s.trim(ctx, s.keys.tasks(guid))
}

// taskHistory is the app's completed tasks, oldest first.
func (s *Service) taskHistory(ctx context.Context, guid string) ([]*basinv1.Task, error) {
	resp, err := s.etcd.Get(ctx, s.keys.tasks(guid), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list tasks of app %s: %w", guid, err)
	}
	out := make([]*basinv1.Task, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		t := &basinv1.Task{}
		if proto.Unmarshal(kv.Value, t) == nil {
			out = append(out, t)
		}
	}
	return out, nil
}

// audit records a user's change; a failure to record is logged, not returned:
// the change itself happened.
func (s *Service) audit(ctx context.Context, a *basinv1.App, typ, desc string) {
	now := s.now().UnixNano()
	kind := strings.TrimPrefix(strings.TrimPrefix(typ, "audit.app."), "app.")
	ev := &basinv1.AppEvent{Type: typ, TimeUnixNano: now, Description: desc}
	if err := s.record(context.WithoutCancel(ctx), a.GetGuid(), s.keys.event(a.GetGuid(), now, kind), ev); err != nil {
		s.log.Warn("record app event", "app", a.GetName(), "err", err)
	}
}

func (s *Service) events(ctx context.Context, guid string) ([]*basinv1.AppEvent, error) {
	resp, err := s.etcd.Get(ctx, s.keys.events(guid), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list events of app %s: %w", guid, err)
	}
	out := make([]*basinv1.AppEvent, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		ev := &basinv1.AppEvent{}
		if proto.Unmarshal(kv.Value, ev) == nil {
			out = append(out, ev)
		}
	}
	return out, nil
}

// bindRoute adds (or with add false removes) app from the route's binding,
// creating the binding when missing.
func (s *Service) bindRoute(ctx context.Context, r *basinv1.Route, app string, add bool) error {
	k := s.keys.route(r)
	for range maxAttempts {
		resp, err := s.etcd.Get(ctx, k)
		if err != nil {
			return fmt.Errorf("read route %s: %w", RouteString(r), err)
		}
		b := &basinv1.RouteBinding{Route: &basinv1.Route{Host: r.GetHost(), Path: r.GetPath()}}
		var rev int64
		if len(resp.Kvs) > 0 {
			rev = resp.Kvs[0].ModRevision
			if err := proto.Unmarshal(resp.Kvs[0].Value, b); err != nil {
				return fmt.Errorf("decode route %s: %w", RouteString(r), err)
			}
		}
		var apps []string
		for _, n := range b.GetApps() {
			if n != app {
				apps = append(apps, n)
			}
		}
		if add {
			apps = append(apps, app)
		}
		b.Apps = apps
		tx, err := s.etcd.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
			Then(clientv3.OpPut(k, string(marshal(b)))).Commit()
		if err != nil {
			return fmt.Errorf("write route %s: %w", RouteString(r), err)
		}
		if tx.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("write route %s: %w", RouteString(r), bbs.ErrConflict)
}

// deleteRoute removes a route binding no other app uses.
func (s *Service) deleteRoute(ctx context.Context, r *basinv1.Route, app string) error {
	k := s.keys.route(r)
	resp, err := s.etcd.Get(ctx, k)
	if err != nil || len(resp.Kvs) == 0 {
		return err
	}
	b := &basinv1.RouteBinding{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, b); err != nil {
		return fmt.Errorf("decode route %s: %w", RouteString(r), err)
	}
	for _, n := range b.GetApps() {
		if n != app {
			return nil
		}
	}
	_, err = s.etcd.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", resp.Kvs[0].ModRevision)).
		Then(clientv3.OpDelete(k)).Commit()
	return err
}

func (s *Service) routes(ctx context.Context) ([]*basinv1.RouteBinding, error) {
	resp, err := s.etcd.Get(ctx, s.keys.routePrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := make([]*basinv1.RouteBinding, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		b := &basinv1.RouteBinding{}
		if proto.Unmarshal(kv.Value, b) == nil {
			out = append(out, b)
		}
	}
	return out, nil
}
