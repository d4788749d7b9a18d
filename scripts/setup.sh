#!/usr/bin/env bash
# Installs what basin needs on this machine from Debian's packages, saying what
# it installs; safe to run again. The package list lives in `basin setup`
# (cmd/basin/setup.go), so the CLI and the scripts agree.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./cmd/basin setup
