package bbs

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/basinpaas/basin/buildpacks"
	basinv1 "github.com/basinpaas/basin/proto/basin/v1"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// MaxBuildpacks bounds the admin buildpacks: every reordering rewrites and
// guards each record in one transaction, within etcd's 128 operations.
const MaxBuildpacks = 50

// buildpackNameRE: names become etcd key segments and directory names in
// the staging container; "sha256_..." is kept for uploaded archives.
var buildpackNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func checkBuildpackName(field, name string) error {
	if name == "" {
		return fieldErr(field, "is required")
	}
	if !buildpackNameRE.MatchString(name) {
		return fieldErr(field, "must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, got %q", name)
	}
	if strings.HasPrefix(strings.ToLower(name), "sha256") {
		return fieldErr(field, "must not start with \"sha256\" (kept for uploaded buildpack archives), got %q", name)
	}
	return nil
}

// BuildpackUpdate changes the fields that are set.
type BuildpackUpdate struct {
	Position *int32
	Enabled  *bool
	Digest   *string
	Filename *string
}

// ListBuildpacks returns the admin buildpacks in position order.
func (s *Store) ListBuildpacks(ctx context.Context) ([]*basinv1.Buildpack, error) {
	bps, _, err := s.listBuildpacks(ctx)
	return bps, err
}

func (s *Store) listBuildpacks(ctx context.Context) ([]*basinv1.Buildpack, int64, error) {
	var out []*basinv1.Buildpack
	var decodeErr error
	rev, err := listPrefix(ctx, s.cli, s.keys.BuildpackPrefix(), 0, func(kv kvPair) {
		bp := &basinv1.Buildpack{}
		if err := proto.Unmarshal(kv.val, bp); err != nil {
			decodeErr = fmt.Errorf("decode %s: %w", kv.key, err)
			return
		}
		bp.Revision = kv.modRev
		out = append(out, bp)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list buildpacks: %w", err)
	}
	sortBuildpacks(out)
	return out, rev, decodeErr
}

// sortBuildpacks orders by position, then name (positions are dense after
// every write; the name only breaks ties in records written by hand).
func sortBuildpacks(bps []*basinv1.Buildpack) {
	slices.SortStableFunc(bps, func(a, b *basinv1.Buildpack) int {
		if a.GetPosition() != b.GetPosition() {
			return int(a.GetPosition() - b.GetPosition())
		}
		return strings.Compare(a.GetName(), b.GetName())
	})
}

// placeBuildpack moves (or inserts) bp to the 1-based position pos of list,
// as `cf create-buildpack NAME PATH POSITION` and `cf update-buildpack -i`
// do: pos 0 or past the end means last. Every record gets its dense
// position 1..n. The list is changed in place order-wise and returned.
func placeBuildpack(list []*basinv1.Buildpack, bp *basinv1.Buildpack, pos int32) []*basinv1.Buildpack {
	out := make([]*basinv1.Buildpack, 0, len(list)+1)
	for _, b := range list {
		if b.GetName() != bp.GetName() {
			out = append(out, b)
		}
	}
	i := int(pos) - 1
	if pos <= 0 || i > len(out) {
		i = len(out)
	}
	out = slices.Insert(out, i, bp)
	renumber(out)
	return out
}

func renumber(list []*basinv1.Buildpack) {
	for i, b := range list {
		b.Position = int32(i + 1)
	}
}

// writeBuildpacks lists the buildpacks, lets change decide the new list (and
// which name to delete), and writes every record whose value changed in one
// transaction. The transaction holds only if no buildpack was created,
// changed or deleted since the listing; otherwise it is decided again.
func (s *Store) writeBuildpacks(ctx context.Context, change func(list []*basinv1.Buildpack) (next []*basinv1.Buildpack, del string, err error)) ([]*basinv1.Buildpack, error) {
	prefix := s.keys.BuildpackPrefix()
	for range maxAttempts {
		list, rev, err := s.listBuildpacks(ctx)
		if err != nil {
			return nil, err
		}
		before := map[string][]byte{}
		revs := map[string]int64{}
		for _, b := range list {
			revs[b.GetName()] = b.GetRevision()
			c := proto.Clone(b).(*basinv1.Buildpack)
			c.Revision = 0
			before[b.GetName()] = marshal(c)
		}
		work := make([]*basinv1.Buildpack, len(list))
		for i, b := range list {
			work[i] = proto.Clone(b).(*basinv1.Buildpack)
		}
		next, del, err := change(work)
		if err != nil {
			return nil, err
		}
		if len(next) > MaxBuildpacks {
			return nil, fieldErr("buildpack", "at most %d admin buildpacks, there would be %d", MaxBuildpacks, len(next))
		}
		// No key under the prefix may be newer than the listing, and every
		// listed one must still exist at its revision (a delete leaves no
		// key to compare in the range).
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(prefix), "<", rev+1).WithPrefix()}
		for name, r := range revs {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.keys.Buildpack(name)), "=", r))
		}
		var ops []clientv3.Op
		written := map[string]bool{}
		for _, b := range next {
			b.Revision = 0
			val := marshal(b)
			if old, ok := before[b.GetName()]; ok && string(old) == string(val) {
				continue
			}
			written[b.GetName()] = true
			if _, ok := revs[b.GetName()]; !ok {
				cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(s.keys.Buildpack(b.GetName())), "=", 0))
			}
			ops = append(ops, clientv3.OpPut(s.keys.Buildpack(b.GetName()), string(val)))
		}
		if del != "" {
			ops = append(ops, clientv3.OpDelete(s.keys.Buildpack(del)))
		}
		if len(ops) == 0 {
			for _, b := range next {
				b.Revision = revs[b.GetName()]
			}
			return next, nil
		}
		resp, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return nil, fmt.Errorf("write buildpacks: %w", err)
		}
		if resp.Succeeded {
			for _, b := range next {
				if written[b.GetName()] {
					b.Revision = resp.Header.Revision
				} else {
					b.Revision = revs[b.GetName()]
				}
			}
			return next, nil
		}
		s.metrics.conflicts.Inc()
	}
	return nil, fmt.Errorf("write buildpacks: %w after %d attempts", ErrConflict, maxAttempts)
}

func findBuildpack(list []*basinv1.Buildpack, name string) *basinv1.Buildpack {
	for _, b := range list {
		if b.GetName() == name {
			return b
		}
	}
	return nil
}

// CreateBuildpack adds an admin buildpack at bp.Position (0: last),
// shifting those at and after it. ErrAlreadyExists when the name is taken.
func (s *Store) CreateBuildpack(ctx context.Context, bp *basinv1.Buildpack) (*basinv1.Buildpack, error) {
	var created *basinv1.Buildpack
	_, err := s.writeBuildpacks(ctx, func(list []*basinv1.Buildpack) ([]*basinv1.Buildpack, string, error) {
		if findBuildpack(list, bp.GetName()) != nil {
			return nil, "", fmt.Errorf("buildpack %s: %w", bp.GetName(), ErrAlreadyExists)
		}
		created = proto.Clone(bp).(*basinv1.Buildpack)
		created.UpdatedAtUnixNano = s.now().UnixNano()
		return placeBuildpack(list, created, bp.GetPosition()), "", nil
	})
	if err != nil {
		return nil, err
	}
	return created, nil
}

// UpdateBuildpack changes an admin buildpack; a new position moves it and
// shifts the others. ErrNotFound when there is none of that name.
func (s *Store) UpdateBuildpack(ctx context.Context, name string, u BuildpackUpdate) (*basinv1.Buildpack, error) {
	var updated *basinv1.Buildpack
	_, err := s.writeBuildpacks(ctx, func(list []*basinv1.Buildpack) ([]*basinv1.Buildpack, string, error) {
		b := findBuildpack(list, name)
		if b == nil {
			return nil, "", fmt.Errorf("buildpack %s: %w", name, ErrNotFound)
		}
		changed := false
		if u.Enabled != nil && *u.Enabled != b.GetEnabled() {
			b.Enabled, changed = *u.Enabled, true
		}
		if u.Digest != nil && *u.Digest != b.GetDigest() {
			b.Digest, changed = *u.Digest, true
		}
		if u.Filename != nil && *u.Filename != b.GetFilename() {
			b.Filename, changed = *u.Filename, true
		}
		if changed {
			b.UpdatedAtUnixNano = s.now().UnixNano()
		}
		updated = b
		if u.Position != nil {
			return placeBuildpack(list, b, *u.Position), "", nil
		}
		return list, "", nil
	})
	if err != nil {
		return nil, err
	}
	return updated, nil
}

// DeleteBuildpack removes an admin buildpack and closes the gap it leaves.
func (s *Store) DeleteBuildpack(ctx context.Context, name string) error {
	_, err := s.writeBuildpacks(ctx, func(list []*basinv1.Buildpack) ([]*basinv1.Buildpack, string, error) {
		if findBuildpack(list, name) == nil {
			return nil, "", fmt.Errorf("buildpack %s: %w", name, ErrNotFound)
		}
		next := slices.DeleteFunc(list, func(b *basinv1.Buildpack) bool { return b.GetName() == name })
		renumber(next)
		return next, name, nil
	})
	return err
}

// BuildpackArchive is a built-in buildpack: its name and its archive
// (tar.gz or zip), as package buildpacks builds them.
type BuildpackArchive = buildpacks.Archive

// registerBuiltin creates each built-in buildpack that is missing (at the
// end, in the order given: their detection order on a fresh platform) and
// points one whose archive changed at the new digest, leaving its position
// and enabled flag as the admin set them. digests[i] is archives[i]'s.
func (s *Store) registerBuiltin(ctx context.Context, archives []BuildpackArchive, digests []string) error {
	_, err := s.writeBuildpacks(ctx, func(list []*basinv1.Buildpack) ([]*basinv1.Buildpack, string, error) {
		now := s.now().UnixNano()
		for i, a := range archives {
			if b := findBuildpack(list, a.Name); b != nil {
				if b.GetDigest() != digests[i] {
					b.Digest, b.UpdatedAtUnixNano = digests[i], now
				}
				continue
			}
			list = append(list, &basinv1.Buildpack{Name: a.Name, Enabled: true, Digest: digests[i],
				Filename: a.Name + ".tgz", UpdatedAtUnixNano: now})
		}
		renumber(list)
		return list, "", nil
	})
	return err
}

// BuildCache returns the digest of the app's last saved build cache, or ""
// when it has none.
func (s *Store) BuildCache(ctx context.Context, appGUID string) (string, error) {
	resp, err := s.cli.Get(ctx, s.keys.BuildCache(appGUID))
	if err != nil {
		return "", fmt.Errorf("read build cache of app %s: %w", appGUID, err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	bc := &basinv1.BuildCache{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, bc); err != nil {
		return "", fmt.Errorf("decode build cache of app %s: %w", appGUID, err)
	}
	return bc.GetDigest(), nil
}

// listBuildCaches returns every app's build cache digest (for the blob GC).
func (s *Store) listBuildCaches(ctx context.Context) ([]string, error) {
	var out []string
	if _, err := listPrefix(ctx, s.cli, s.keys.BuildCachePrefix(), 0, func(kv kvPair) {
		bc := &basinv1.BuildCache{}
		if proto.Unmarshal(kv.val, bc) == nil {
			out = append(out, bc.GetDigest())
		}
	}); err != nil {
		return nil, fmt.Errorf("list build caches: %w", err)
	}
	return out, nil
}
