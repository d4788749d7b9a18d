#!/usr/bin/env bash
# The project's test command (make test, called by .ci/run): installs what the
# tests need, then runs vet, unit tests with -race and the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
	go run ./cmd/basin setup --for-tests
else
	echo "basin test: not root; tests that need root or containerd will skip and say so"
fi

echo "== lint: gofmt, go vet, buf lint, buf breaking"
make -s lint
go vet -tags integration ./integration/...

echo "== generated protobuf code matches the .proto files"
make -s generate
git diff --exit-code --stat -- proto/

echo "== unit tests (-race)"
go test -race -count=1 -timeout 20m ./...

echo "== integration tests (-race)"
go test -race -count=1 -timeout 30m -tags integration ./integration/...
