#!/usr/bin/env bash
# The example clients, briefly, end to end against a real deft-server (exact fp32 weights, so
# verification and greedy decoding see the same logits): speculative decoding must reproduce
# greedy Generate token for token; few_shot votes; tree_of_thought finds a path.
#   examples_test.sh BIN_DIR DEFT_SERVER MODEL
set -u
bin=$1 server_bin=$2 model=$3
source "$(dirname "$0")/server_fixture.sh"
start_deft_server "$server_bin" "$model" --exact
fail=0
run() {  # run NAME SUBSTRING -- PROGRAM ARGS...: exit 0 and SUBSTRING in the output
  local name=$1 want=$2; shift 3
  local out rc
  out=$("$bin/$1" --server "$DEFT_ADDR" "${@:2}" 2>&1); rc=$?
  if [[ $rc -ne 0 || $out != *"$want"* ]]; then
    echo "FAIL $name: exit $rc, want 0 and '$want'; output: $out"; fail=1
  else
    echo "ok   $name"; echo "$out" | tail -4 | sed 's/^/       /'
  fi
}
run speculative "output equals greedy Generate: yes" -- speculative --max_tokens 24 --quiet
run speculative_raw_code "output equals greedy Generate: yes" -- speculative --raw --max_tokens 16 \
  --prompt "def add(a, b):
    return a + b

def sub(a, b):
    return a - b

def mul(a, b):
"
run few_shot "majority answer:" -- few_shot --samples 3 --max_tokens 24
run tree_of_thought "best path (mean score" -- tree_of_thought --depth 2 --k 2 --beam 1 --step_tokens 12
for p in speculative few_shot tree_of_thought; do
  out=$("$bin/$p" --help 2>&1)
  if [[ $out == *"--server"* ]]; then echo "ok   $p --help"; else echo "FAIL $p --help: $out"; fail=1; fi
done
# An unreachable server: exit 1 with the connection's status.
out=$("$bin/few_shot" --server 127.0.0.1:1 --wait_seconds 1 2>&1); rc=$?
if [[ $rc -eq 1 && $out == *"few_shot: connect: DEADLINE_EXCEEDED: server at 127.0.0.1:1 not serving"* ]]; then
  echo "ok   unreachable"
else
  echo "FAIL unreachable: exit $rc: $out"; fail=1
fi
exit $fail
