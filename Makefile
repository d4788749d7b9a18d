# basin's build, test and benchmark entry points. Everything a fresh machine
# needs is installed by scripts/ from Debian's packages and the Go module proxy.

GO        ?= go
BUF       := $(GO) run github.com/bufbuild/buf/cmd/buf@v1.75.0
BIN       := bin
GOFLAGS_TEST ?= -race -count=1

.PHONY: all build test unit lint generate bench bench-bbs bench-router up clean bench-cell bench-auction bench-staging

all: build

# basin-launcher and basin-builder run inside containers on any stack, so
# they are built static.
build:
	$(GO) build -o $(BIN)/ ./cmd/...
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/basin-launcher ./cmd/basin-builder

# test is what .ci/run calls and what the README tells a newcomer to run.
test:
	bash scripts/test.sh

unit:
	$(GO) test $(GOFLAGS_TEST) ./...

lint:
	gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$') | (! grep .)
	$(GO) vet ./...
	$(BUF) lint
	@if git rev-parse --verify -q main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then \
		$(BUF) breaking --against '.git#branch=main'; fi

generate:
	$(BUF) generate

# up starts the whole platform on this machine (UP_FLAGS: more dev up flags).
up: build
	$(BIN)/basin dev up $(UP_FLAGS)

bench: bench-bbs bench-router bench-cell bench-auction bench-staging

bench-bbs:
	$(GO) run ./bbs/bench

# bench-auction places 100,000 instances of 1,000 LRPs on 1,000 simulated
# cells through the real BBS and auctioneer.
bench-auction:
	$(GO) run ./auctioneer/bench

# bench-cell starts instances on one cell against the raw containerd client
# (needs root: it runs its own containerd, runc and CNI).
bench-cell:
	$(GO) run ./cell/bench

# bench-staging times the first push of a static and a binary app to 200
# through the router, and a scale-out to 10 routable instances, on a real
# basin dev up (needs root; builds the bookworm stack on first use).
bench-staging:
	$(GO) run ./buildpacks/bench

# bench-router compares the router with nginx and haproxy and measures churn.
bench-router:
	bash scripts/bench-router.sh

clean:
	rm -rf $(BIN)
