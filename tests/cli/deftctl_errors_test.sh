#!/usr/bin/env bash
# deftctl generate: bad input gives a clear message and a non-zero exit, never a crash.
#   deftctl_errors_test.sh DEFTCTL MODEL
set -u
deftctl=$1 model=$2
fail=0
expect() {  # expect NAME WANT_RC MESSAGE_SUBSTRING -- ARGS...
  local name=$1 want_rc=$2 want_msg=$3; shift 4
  local out rc
  out=$("$deftctl" "$@" 2>&1); rc=$?
  if [[ $rc -ne $want_rc ]]; then
    echo "FAIL $name: exit $rc, want $want_rc; output: $out"; fail=1
  elif [[ $out != *"$want_msg"* ]]; then
    echo "FAIL $name: output lacks '$want_msg': $out"; fail=1
  else
    echo "ok   $name"
  fi
}
long_prompt=$(python3 -c "print('tree ' * 9000)")
expect missing_model 1 "model not found: /nonexistent.gguf" -- generate --model /nonexistent.gguf --prompt hi
expect not_a_model 1 "cannot load model" -- generate --model /etc/hostname --prompt hi
expect no_prompt 2 "--prompt is required" -- generate --model "$model"
expect prompt_too_long 1 "the model's context holds 8192" -- generate --model "$model" --raw --prompt "$long_prompt"
expect bad_temperature 2 "temperature must be >= 0" -- generate --model "$model" --prompt hi --temperature -1
expect bad_top_p 2 "top_p must be in (0, 1]" -- generate --model "$model" --prompt hi --top_p 0
expect unknown_command 2 "unknown command 'frobnicate'" -- frobnicate
expect greedy_ok 0 "finish:" -- generate --model "$model" --prompt "Say hi" --max_tokens 4
exit $fail
