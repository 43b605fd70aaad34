# Sourced by the CLI tests: starts deft-server on a free loopback port and waits until it serves.
#   start_deft_server DEFT_SERVER MODEL [extra deft-server flags...]
# Sets $DEFT_ADDR (127.0.0.1:PORT) and $DEFT_SERVER_PID; the server is stopped on exit.
start_deft_server() {
  local bin=$1 model=$2; shift 2
  DEFT_SERVER_LOG=$(mktemp)
  "$bin" --listen 127.0.0.1:0 --model "$model" --kv_pool_mb 64 --tree_ttl_seconds 0 "$@" \
    2>"$DEFT_SERVER_LOG" &
  DEFT_SERVER_PID=$!
  trap 'kill $DEFT_SERVER_PID 2>/dev/null; wait $DEFT_SERVER_PID 2>/dev/null; rm -f "$DEFT_SERVER_LOG"' EXIT
  local port=""
  for _ in $(seq 1 1200); do  # up to 120 s: the model loads on a busy machine
    [[ -z $port ]] && port=$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$DEFT_SERVER_LOG")
    if grep -q "deft-server: serving" "$DEFT_SERVER_LOG"; then
      DEFT_ADDR=127.0.0.1:$port
      return 0
    fi
    if ! kill -0 $DEFT_SERVER_PID 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "FAIL deft-server did not start:"; cat "$DEFT_SERVER_LOG"
  exit 1
}
