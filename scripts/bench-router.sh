#!/usr/bin/env bash
# make bench-router: basin's router against a direct connection, nginx and
# haproxy on loopback (same Go backend, proxy and backend on one core, wrk on
# the other), then 100,000 routes under 1,000 route changes/s.
# Each target and connection count is measured in BENCH_ROUNDS (3) interleaved
# rounds and keeps its best, since other work on the machine skews single runs.
# Knobs: BENCH_DURATION (4s), BENCH_CONNS (64,256), BENCH_ROUNDS, BENCH_ARGS (extra flags
# for gorouter/bench, e.g. -skip-churn), BENCH_PROFILE (CPU profile path).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
command -v haproxy >/dev/null || need+=(haproxy)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "bench-router: need ${need[*]}; run as root or install them" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$(nproc)" -lt 2 ]; then
	echo "bench-router: needs 2 CPUs (proxy on one, wrk on the other)" >&2
	exit 1
fi

out=$(mktemp -d /tmp/basin-bench-router-bin.XXXXXX)
trap 'rm -rf "$out"' EXIT
go build -o "$out/gorouter" ./cmd/gorouter
go build -o "$out/bench" ./gorouter/bench

profile=${BENCH_PROFILE:-}
args=(-gorouter "$out/gorouter" -duration "${BENCH_DURATION:-4s}" -conns "${BENCH_CONNS:-64,256}" -rounds "${BENCH_ROUNDS:-3}")
if [ -n "$profile" ]; then
	args+=(-profile "$profile")
fi
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
if [ -n "$profile" ]; then
	# The RESULT lines are printed once, last, after the profile.
	"$out/bench" "${args[@]}" ${BENCH_ARGS:-} | tee "$out/result.txt" | grep -v '^RESULT' || true
	test -s "$out/result.txt" && grep -q '^RESULT' "$out/result.txt"
else
	"$out/bench" "${args[@]}" ${BENCH_ARGS:-} | tee "$out/result.txt"
fi

if [ -n "$profile" ] && [ -s "$profile" ]; then
	echo
	echo "== where basin's router spends CPU (top 25, $profile)"
	go tool pprof -top -nodecount=25 "$out/gorouter" "$profile" 2>/dev/null | tail -n 26
	# The table, the churn line and the RESULT lines stay last.
	echo
	awk '/^target /{p=1} p&&/^$/{exit} p' "$out/result.txt"
	grep '^churn: [0-9]' "$out/result.txt" || true
	grep '^RESULT' "$out/result.txt"
fi
