# shellcheck shell=bash
# Shared by the bench scripts (sourced by scripts/bench-peers and scripts/bench-ab):
# the load generator's knobs for the rate scenarios, and starting and stopping a
# throw-away pubsub: a free port, a temp data directory, --log warn, and a stop that
# always runs (callers install `trap stop_pubsub EXIT`).

# The arguments of a rate scenario for pubsub-bench or peers-bench: $1 label
# (throughput, http, fanout, latency, manual_ack), $2 messages, $3 duration of the
# fixed-rate run. Prints "<scenario> <knobs...>", or nothing for another label.
rate_args() {
  case "$1" in
    throughput) echo "throughput --messages $2" ;;
    http) echo "throughput --messages $2 --transport http" ;;
    fanout) echo "fanout --messages $2" ;;
    latency) echo "latency --rate 5000 --duration $3" ;;
    manual_ack) echo "throughput --messages $2 --ack manual --prefetch 100 --ack-every 50" ;;
  esac
}

# The unmeasured warm-up run that a fresh pubsub gets before a measured one of
# `rate_args $1 $2 ...`: a quarter of the messages (an eighth over HTTP), or one
# second at the fixed rate.
warmup_args() {
  local n=$(($2 / 4))
  if [ "$1" = http ]; then n=$((n / 2)); fi
  rate_args "$1" "$n" 1s
}

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
