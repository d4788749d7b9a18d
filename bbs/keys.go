package bbs

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// DefaultPrefix is where basin keeps its state in etcd unless told otherwise.
const DefaultPrefix = "/basin/"

// Keys builds the etcd key layout of ARCHITECTURE.md under one prefix. Every
// component that reads or writes etcd directly (cells for presence and routes,
// the router, leader election) uses it, so the layout lives in one place.
type Keys struct {
	Prefix string
}

// NewKeys returns the key layout under prefix, which gets a trailing slash.
func NewKeys(prefix string) Keys {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return Keys{Prefix: prefix}
}

// Desired LRPs keep their two parts under two prefixes, so whoever needs
// only schedules (cells watching routes, the auctioneer and converger
// listing) reads and watches schedules without every run part.
func (k Keys) DesiredPrefix() string              { return k.Prefix + "desired/" }
func (k Keys) DesiredSchedulePrefix() string      { return k.Prefix + "desired/schedule/" }
func (k Keys) DesiredRunPrefix() string           { return k.Prefix + "desired/run/" }
func (k Keys) DesiredSchedule(guid string) string { return k.DesiredSchedulePrefix() + guid }
func (k Keys) DesiredRun(guid string) string      { return k.DesiredRunPrefix() + guid }

// DesiredPart splits a desired LRP key into its process guid and part
// ("schedule" or "run").
func (k Keys) DesiredPart(key string) (guid, part string, ok bool) {
	part, guid, ok = strings.Cut(strings.TrimPrefix(key, k.DesiredPrefix()), "/")
	if !ok || guid == "" || strings.Contains(guid, "/") || (part != "schedule" && part != "run") {
		return "", "", false
	}
	return guid, part, true
}

func (k Keys) ActualPrefix() string { return k.Prefix + "actual/" }
func (k Keys) ActualLRPPrefix(guid string) string {
	return k.Prefix + "actual/" + guid + "/"
}

// Actual, CellIndex and Unclaimed are built on every instance transition, so
// each is one concatenation (one allocation), not a prefix plus the rest.
func (k Keys) Actual(guid string, index int32) string {
	return k.Prefix + "actual/" + guid + "/" + strconv.Itoa(int(index))
}

// CellIndexPrefix lists one cell's instances.
func (k Keys) CellIndexPrefix(cellID string) string { return k.Prefix + "index/cell/" + cellID + "/" }
func (k Keys) CellIndex(cellID, guid string, index int32) string {
	return k.Prefix + "index/cell/" + cellID + "/" + guid + "/" + strconv.Itoa(int(index))
}

// UnclaimedPrefix is the auctioneer's queue of instances to place.
func (k Keys) UnclaimedPrefix() string { return k.Prefix + "index/unclaimed/" }
func (k Keys) Unclaimed(guid string, index int32) string {
	return k.Prefix + "index/unclaimed/" + guid + "/" + strconv.Itoa(int(index))
}

// PendingTaskPrefix is the auctioneer's queue of tasks to place.
func (k Keys) PendingTaskPrefix() string      { return k.Prefix + "index/pending/" }
func (k Keys) PendingTask(guid string) string { return k.PendingTaskPrefix() + guid }

func (k Keys) TaskPrefix() string      { return k.Prefix + "tasks/" }
func (k Keys) Task(guid string) string { return k.TaskPrefix() + guid }

func (k Keys) CellPrefix() string        { return k.Prefix + "cells/" }
func (k Keys) Cell(cellID string) string { return k.CellPrefix() + cellID }

// isCell reports whether key is Cell(cellID) without building that string:
// every cell call checks its fence this way.
func (k Keys) isCell(key, cellID string) bool {
	rest, ok := strings.CutPrefix(key, k.Prefix)
	if !ok {
		return false
	}
	rest, ok = strings.CutPrefix(rest, "cells/")
	return ok && rest == cellID
}

func (k Keys) RoutePrefix() string { return k.Prefix + "routes/" }

// Route is routes/<host>/<process_guid>/<index>. A context path is folded into
// the host segment, escaped, so one LRP may serve several paths of a host.
func (k Keys) Route(host, path, guid string, index int32) string {
	seg := host
	if path != "" && path != "/" {
		seg += url.PathEscape(path)
	}
	return fmt.Sprintf("%sroutes/%s/%s/%d", k.Prefix, seg, guid, index)
}

// BuildpackPrefix holds the admin buildpacks, one record per name.
func (k Keys) BuildpackPrefix() string      { return k.Prefix + "buildpacks/" }
func (k Keys) Buildpack(name string) string { return k.BuildpackPrefix() + name }

// BuildCachePrefix holds, per app, the digest of its last build cache.
func (k Keys) BuildCachePrefix() string         { return k.Prefix + "buildcache/" }
func (k Keys) BuildCache(appGUID string) string { return k.BuildCachePrefix() + appGUID }

func (k Keys) LeaderPrefix() string           { return k.Prefix + "leaders/" }
func (k Keys) Leader(component string) string { return k.LeaderPrefix() + component }

// ParseActual splits an actual/<guid>/<index> key.
func (k Keys) ParseActual(key string) (guid string, index int32, ok bool) {
	rest, found := strings.CutPrefix(key, k.ActualPrefix())
	if !found {
		return "", 0, false
	}
	return splitGuidIndex(rest)
}

// ParseUnclaimed splits an index/unclaimed/<guid>/<index> key.
func (k Keys) ParseUnclaimed(key string) (guid string, index int32, ok bool) {
	rest, found := strings.CutPrefix(key, k.UnclaimedPrefix())
	if !found {
		return "", 0, false
	}
	return splitGuidIndex(rest)
}

// ParseCellIndex splits an index/cell/<cell>/<guid>/<index> key.
func (k Keys) ParseCellIndex(key string) (cellID, guid string, index int32, ok bool) {
	rest, found := strings.CutPrefix(key, k.Prefix+"index/cell/")
	if !found {
		return "", "", 0, false
	}
	cellID, rest, found = strings.Cut(rest, "/")
	if !found {
		return "", "", 0, false
	}
	guid, index, ok = splitGuidIndex(rest)
	return cellID, guid, index, ok
}

func splitGuidIndex(s string) (string, int32, bool) {
	guid, idx, found := strings.Cut(s, "/")
	if !found || guid == "" {
		return "", 0, false
	}
	n, err := strconv.ParseInt(idx, 10, 32)
	if err != nil || n < 0 {
		return "", 0, false
	}
	return guid, int32(n), true
}
