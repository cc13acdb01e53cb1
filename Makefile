# switchyard — the two commands a newcomer needs: `make run` and `make test`.

CONFIG ?= config/switchyard.toml
BIN := target/release/switchyard

.PHONY: run test build fmt lint bench clean

## Build (release) and run one node on the embedded memory engine.
run: build
	@echo ""
	@echo "switchyard is starting on http://127.0.0.1:8000 (memory engine, $(CONFIG))."
	@echo "In another terminal:"
	@echo "  TOKEN=\$$($(BIN) -c $(CONFIG) token --user alice --caps 'chat.>=sub+pub+history+presence')"
	@echo "  cargo run -q --example ws-client -- \"ws://127.0.0.1:8000/ws?token=\$$TOKEN\""
	@echo "then type: {\"type\":\"subscribe\",\"channel\":\"chat.room.1\"}"
	@echo "           {\"type\":\"publish\",\"channel\":\"chat.room.1\",\"data\":{\"text\":\"hello\"}}"
	@echo "Stop with Ctrl-C (the node drains its clients first)."
	@echo ""
	$(BIN) -c $(CONFIG) serve

build:
	cargo build --release --bin switchyard

## Format check, lints as errors, every test.
test:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo test --all-targets

fmt:
	cargo fmt --all

## Load benchmark: node pinned to CPU 0, load generator to CPU 1 (see examples/bench.rs).
bench: build
	cargo build --release --example bench
	ulimit -n 20000 && taskset -c 1 target/release/examples/bench

clean:
	cargo clean
