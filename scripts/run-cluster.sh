#!/usr/bin/env bash
# `make run-cluster`: a local nats-server with JetStream (temporary store), a local
# redis-server (no persistence) and three switchyard nodes on 127.0.0.1:8001-8003
# on the NATS engine with Redis presence. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS=${NATS_SERVER:-.venv/bin/nats-server}
BIN=target/release/switchyard
CONFIG=config/switchyard.toml
NATS_PORT=${NATS_PORT:-4222}
NATS_HTTP_PORT=${NATS_HTTP_PORT:-8222}
REDIS_PORT=${REDIS_PORT:-6379}
API_KEY=${API_KEY:-dev-api-key}

dir=$(mktemp -d)
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

cat > "$dir/nats.conf" <<CONF
listen: "127.0.0.1:${NATS_PORT}"
http: "127.0.0.1:${NATS_HTTP_PORT}"
jetstream { store_dir: "$dir/js", max_memory_store: 256MB, max_file_store: 1GB }
CONF
"$NATS" -c "$dir/nats.conf" -l "$dir/nats.log" &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q "Server is ready" "$dir/nats.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "Server is ready" "$dir/nats.log" || { echo "nats-server did not start:"; cat "$dir/nats.log"; exit 1; }

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log" &
pids+=($!)
for _ in $(seq 1 100); do
  redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG || { echo "redis-server did not start:"; cat "$dir/redis.log"; exit 1; }

for n in 1 2 3; do
  SWITCHYARD_ENGINE__KIND=nats \
  SWITCHYARD_NATS__URL="nats://127.0.0.1:${NATS_PORT}" \
  SWITCHYARD_REDIS__URL="redis://127.0.0.1:${REDIS_PORT}" \
  SWITCHYARD_API__KEY="$API_KEY" \
  SWITCHYARD_FEED__EMBEDDED=false \
  SWITCHYARD_SERVER__LISTEN="127.0.0.1:800${n}" \
  SWITCHYARD_SERVER__NODE_ID="node${n}" \
    "$BIN" -c "$CONFIG" serve &
  pids+=($!)
done

# The price feed as its own process (synthetic ticks; health on 127.0.0.1:8100).
SWITCHYARD_ENGINE__KIND=nats \
SWITCHYARD_NATS__URL="nats://127.0.0.1:${NATS_PORT}" \
SWITCHYARD_REDIS__URL="redis://127.0.0.1:${REDIS_PORT}" \
  "$BIN" -c "$CONFIG" feed &
pids+=($!)

cat <<HELP

nats-server on 127.0.0.1:${NATS_PORT} (monitoring http://127.0.0.1:${NATS_HTTP_PORT}), store in $dir
redis-server on 127.0.0.1:${REDIS_PORT} (no persistence)
switchyard nodes: ws://127.0.0.1:8001/ws  ws://127.0.0.1:8002/ws  ws://127.0.0.1:8003/ws
price feed (synthetic): health http://127.0.0.1:8100/readyz, ticks on prices.BTC-USDT etc.

In another terminal, subscribe on node 3:
  TOKEN=\$($BIN -c $CONFIG token --user alice --caps 'chat.>=sub+pub+history+presence')
  cargo run -q --example ws-client -- "ws://127.0.0.1:8003/ws?token=\$TOKEN"
  {"type":"subscribe","channel":"chat.room.1"}
and in a third, publish on node 1:
  cargo run -q --example ws-client -- "ws://127.0.0.1:8001/ws?token=\$TOKEN"
  {"type":"publish","channel":"chat.room.1","data":{"text":"hello from node 1"}}
Presence, users and nodes across the cluster (server API key: $API_KEY):
  curl -H "Authorization: apikey $API_KEY" http://127.0.0.1:8002/api/v1/presence/chat.room.1
  curl -H "Authorization: apikey $API_KEY" http://127.0.0.1:8002/api/v1/users/alice
  curl -H "Authorization: apikey $API_KEY" http://127.0.0.1:8002/api/v1/nodes
  curl -H "Authorization: apikey $API_KEY" http://127.0.0.1:8003/api/v1/prices
Ctrl-C stops everything.

HELP
wait
