#!/usr/bin/env bash
# Instructions a node spends per client publication on the NATS engine, counted by
# callgrind (repeatable where CPU seconds are not): a node under valgrind, one
# WebSocket connection pipelining N1 and then N2 publishes to ten bench.* channels,
# (total(N2) - total(N1)) / (N2 - N1). `make bench-instructions` runs it.
# Usage: scripts/publish-instructions.sh BINARY NATS_SERVER [N1 N2]
set -euo pipefail
bin=$(realpath "$1"); nats=$(realpath "$2"); n1=${3:-1000}; n2=${4:-5000}
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release --example ws-client
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

total() {
  local n=$1 dir nats_port ws_port pids=()
  dir=$(mktemp -d); nats_port=$(port); ws_port=$(port)
  "$nats" -js -sd "$dir/js" -a 127.0.0.1 -p "$nats_port" >"$dir/nats.log" 2>&1 & pids+=($!)
  SWITCHYARD_ENGINE__KIND=nats SWITCHYARD_NATS__URL="nats://127.0.0.1:$nats_port" \
  SWITCHYARD_SERVER__LISTEN="127.0.0.1:$ws_port" SWITCHYARD_FEED__EMBEDDED=false \
  SWITCHYARD_SESSION__RATE_BYTES_PER_SEC=1000000000 SWITCHYARD_SESSION__RATE_FRAMES_PER_SEC=1000000 \
  SWITCHYARD_SESSION__RATE_FRAMES_BURST=1000000 SWITCHYARD_NAMESPACES__BENCH__CLIENT_PUBLISH=true \
  SWITCHYARD_NAMESPACES__BENCH__HISTORY_SIZE=16 SWITCHYARD_LOG__JSON=true \
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" -c config/switchyard.toml serve \
    >"$dir/node.log" 2>&1 &
  local node=$!
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$ws_port/readyz" >/dev/null && break; sleep 0.2; done
  local token
  token=$("$bin" -c config/switchyard.toml token --user bench --caps 'bench.>=pub' 2>/dev/null)
  python3 -c "
for i in range($n):
    print('{\"type\":\"publish\",\"channel\":\"bench.c%d\",\"data\":{\"v\":\"0123456789012345678901234567890123456789\"}}' % (i % 10))
" >"$dir/frames"
  # The client keeps its input open until every publish is answered.
  (cat "$dir/frames"; while [ "$(grep -c '"published"' "$dir/out" 2>/dev/null || true)" -lt "$n" ]; do sleep 0.2; done) |
    target/release/examples/ws-client "ws://127.0.0.1:$ws_port/ws?token=$token" >"$dir/out" 2>&1 || true
  kill -TERM "$node"; wait "$node" 2>/dev/null || true
  kill "${pids[@]}" 2>/dev/null || true
  local errors; errors=$(grep -c '"error"' "$dir/out" || true)
  [ "$errors" = 0 ] || { echo "$errors publishes refused: $(grep -m1 '"error"' "$dir/out")" >&2; exit 1; }
  sed -n 's/^summary: //p' "$dir/cg.out"
  rm -rf "$dir"
}

a=$(total "$n1"); b=$(total "$n2")
echo "instructions: $a for $n1 publications, $b for $n2: $(( (b - a) / (n2 - n1) )) per client publication"
