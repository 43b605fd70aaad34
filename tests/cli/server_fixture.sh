# Sourced by the CLI tests: starts deft-server on a free loopback port and waits until it serves.
#   start_deft_server DEFT_SERVER MODEL [extra deft-server flags...]
# Sets $DEFT_PORT and $DEFT_ADDR (127.0.0.1:PORT). Every server started is stopped on exit.
DEFT_SERVER_PIDS=()
DEFT_SERVER_LOGS=()
stop_deft_servers() {
  local pid
  for pid in "${DEFT_SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  rm -f "${DEFT_SERVER_LOGS[@]}"
}
trap stop_deft_servers EXIT

start_deft_server() {
  local bin=$1 model=$2; shift 2
  local log pid port=""
  log=$(mktemp)
  "$bin" --listen 127.0.0.1:0 --model "$model" --kv_pool_mb 64 --tree_ttl_seconds 0 "$@" \
    2>"$log" &
  pid=$!
  DEFT_SERVER_PIDS+=("$pid")
  DEFT_SERVER_LOGS+=("$log")
  for _ in $(seq 1 1200); do  # up to 120 s: the model loads on a busy machine
    [[ -z $port ]] && port=$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$log")
    if grep -q "deft-server: serving" "$log"; then
      DEFT_PORT=$port
      DEFT_ADDR=127.0.0.1:$port
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "FAIL deft-server did not start:"; cat "$log"
  exit 1
}
