# shellcheck shell=bash
# Starting and stopping a throw-away pubsub for the bench scripts (sourced by
# scripts/bench-peers and scripts/bench-ab): a free port, a temp data directory,
# --log warn, and a stop that always runs (callers install `trap stop_pubsub EXIT`).

# True when something accepts connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port nothing listens on, from the range below the kernel's ephemeral ports.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 12000))
    if ! listening "$p"; then echo "$p"; return 0; fi
  done
  echo "no free port found" >&2; return 1
}

SERVER_PID=""
SERVER_DIR=""
SERVER_ADDR=""
# Starts binary $1 with --shards $SHARDS (default 2) and the extra arguments that
# follow; sets SERVER_PID/SERVER_DIR/SERVER_ADDR (no subshell, so the EXIT trap and
# stop_pubsub can always reach it). Fails, with the server's log, if it never listens.
start_pubsub() {
  local bin="$1"; shift
  local port; port="$(free_port)"
  SERVER_DIR="$(mktemp -d /tmp/pubsub-bench.XXXXXX)"
  "$bin" --listen "127.0.0.1:$port" --shards "${SHARDS:-2}" --data-dir "$SERVER_DIR" --log warn "$@" \
    > "$SERVER_DIR/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    if listening "$port"; then SERVER_ADDR="127.0.0.1:$port"; return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "pubsub did not start; log:" >&2; cat "$SERVER_DIR/server.log" >&2 || true
  stop_pubsub
  return 1
}

stop_pubsub() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ -n "$SERVER_DIR" ]; then rm -rf "$SERVER_DIR"; fi
  SERVER_PID=""; SERVER_DIR=""
}
