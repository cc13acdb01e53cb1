#!/usr/bin/env bash
# The HTTP API contract check (`make api-contract`, run by `make test`):
# validates docs/openapi.yaml, then runs schemathesis with every check and a pinned
# seed against a live node, once on the memory engine and once on a real
# nats-server. The node serves its own contract (its namespaces in the channel
# patterns), which is what schemathesis reads.
#
# usage: scripts/api-contract.sh BIN NATS_SERVER VENV
set -euo pipefail
bin=$(realpath "$1") nats_server=$(realpath "$2") venv=$(realpath "$3")
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Polls an HTTP URL until it answers 200 (an upper bound of 10 s, not a sleep).
wait_ready() {
  "$venv/bin/python" - "$1" <<'PY'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + 10
while True:
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            break
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit(f"{url} did not become ready")
    time.sleep(0.05)
PY
}

"$venv/bin/openapi-spec-validator" "$here/docs/openapi.yaml"

# Runs schemathesis against one node; extra environment selects the engine.
check() {
  local name=$1; shift
  local port; port=$(free_port)
  env "$@" SWITCHYARD_SERVER__LISTEN="127.0.0.1:$port" SWITCHYARD_LOG__LEVEL=warn \
    "$bin" --config "$here/tests/contract/node.toml" serve >"$work/$name.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz"
  echo "api-contract: schemathesis against a node on the $name engine"
  (cd "$work" && "$venv/bin/schemathesis" run "http://127.0.0.1:$port/api/v1/openapi.yaml" \
    --header 'Authorization: apikey contract-key' \
    --checks all --seed 1 --max-examples 50 --no-color) || {
      echo "api-contract: failures on the $name engine; node log:" >&2
      cat "$work/$name.log" >&2
      return 1
    }
}

check memory

nats_port=$(free_port) nats_http=$(free_port)
cat >"$work/nats.conf" <<EOF
listen: "127.0.0.1:$nats_port"
http: "127.0.0.1:$nats_http"
jetstream { store_dir: "$work/js", max_memory_store: 64MB, max_file_store: 256MB }
EOF
"$nats_server" -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$nats_http/healthz?js-enabled-only=true"
check nats SWITCHYARD_ENGINE__KIND=nats SWITCHYARD_NATS__URL="nats://127.0.0.1:$nats_port"
echo "api-contract: passed on both engines"
