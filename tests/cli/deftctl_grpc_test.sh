#!/usr/bin/env bash
# deftctl's gRPC subcommands against a real deft-server on a free loopback port: the README's
# three-line session (tree create, tree generate, tree show), every other subcommand, and errors
# (exit code and the server's status code and message).
#   deftctl_grpc_test.sh DEFTCTL DEFT_SERVER MODEL
set -u
deftctl=$1 server_bin=$2 model=$3
source "$(dirname "$0")/server_fixture.sh"
start_deft_server "$server_bin" "$model"
fail=0
# expect NAME WANT_RC SUBSTRING... -- ARGS...: runs deftctl --server ADDR ARGS, checks the exit
# code and that stdout+stderr contains every SUBSTRING.
expect() {
  local name=$1 want_rc=$2; shift 2
  local wants=()
  while [[ $1 != -- ]]; do wants+=("$1"); shift; done
  shift
  local out rc
  out=$("$deftctl" --server "$DEFT_ADDR" "$@" 2>&1); rc=$?
  if [[ $rc -ne $want_rc ]]; then
    echo "FAIL $name: exit $rc, want $want_rc; output: $out"; fail=1; return
  fi
  for w in "${wants[@]}"; do
    if [[ $out != *"$w"* ]]; then echo "FAIL $name: output lacks '$w': $out"; fail=1; return; fi
  done
  echo "ok   $name"
}

# The three-line session.
tree=$("$deftctl" --server "$DEFT_ADDR" tree create --chat "Name three trees." 2>/dev/null)
if [[ ! $tree =~ ^[0-9a-f]{32}$ ]]; then echo "FAIL create: got '$tree'"; exit 1; fi
echo "ok   create ($tree)"
expect generate 0 "[node 1] " "[node 2] " "[node 1] finish: length, 6 tokens" "2 branches, 12 tokens" \
  -- tree generate "$tree" --branches 2 --max_tokens 6 --temperature 0.8 --ignore_eos
expect show 0 "tree $tree: 3 nodes" "0 [" "|- 1 [6 tokens" "\`- 2 [6 tokens" "<|im_start|>" \
  -- tree show "$tree"

# One branch streams plain text; the rest of the subcommands.
expect generate_one 0 "[node 1] finish: length, 3 tokens" -- tree generate "$tree" 1 --max_tokens 3 --ignore_eos
expect fork 0 "3 4" "children of node 2" -- tree fork "$tree" 2 --count 2
expect extend 0 "" -- tree extend "$tree" 3 " Oak, pine and birch"
expect extend_tokens 0 "2" -- tree extend "$tree" 4 --tokens 28,29
expect verify 0 "accepted draft indices:" "committed tokens:" -- tree verify "$tree" 4 --tokens 30,31,32 --parents=-1,0,-1
expect beam 0 "[node " "score" -- tree beam "$tree" 3 --width 2 --max_tokens 2
expect prune 0 "" -- tree prune "$tree" 4
expect show_after 0 "- 3 [" -- tree show "$tree" --text_width 10
expect list 0 "$tree" -- tree list
expect model_info 0 "vocab_size: 49152" "backend: cpu" -- model info
expect tokenize 0 "1 tokens" -- tokenize "<|im_start|>" --parse_special
expect detokenize 0 "Hello" -- detokenize "19556"

# Errors: the server's code and message, exit 1; bad usage, exit 2.
unknown=00000000000000000000000000000000
expect unknown_tree 1 "deftctl: GetTree: NOT_FOUND: tree \"$unknown\" not found" -- tree show "$unknown"
expect fork_count_0 1 "deftctl: Fork: INVALID_ARGUMENT: count must be in [1, 4096], got 0" \
  -- tree fork "$tree" 0 --offset 0 --count 0
expect bad_token 1 "deftctl: Detokenize: INVALID_ARGUMENT: token_ids[0]: 49152 is outside the vocabulary [0, 49152)" \
  -- detokenize 49152
expect extend_not_leaf 1 "deftctl: Extend: FAILED_PRECONDITION:" -- tree extend "$tree" 0 "x"
expect delete 0 "" -- tree delete "$tree"
expect deleted_tree 1 "NOT_FOUND: tree \"$tree\" not found" -- tree generate "$tree"
expect no_tree_id 2 "wrong number of arguments" -- tree show
expect bad_node 2 "NODE: not an integer: \"abc\"" -- tree prune "$unknown" abc
expect unknown_sub 2 "unknown tree command 'grow'" -- tree grow
expect bad_key_file 2 "--api_key_file: cannot read /nonexistent" -- --api_key_file /nonexistent tree list
expect unreachable 1 "deftctl: ListTrees: UNAVAILABLE:" -- --server 127.0.0.1:1 --timeout 5 tree list

# A second server with TLS and API keys: --tls_ca and --api_key / --api_key_file reach it.
dir=$(mktemp -d)
trap 'stop_deft_servers; rm -rf "$dir"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -days 1 -keyout "$dir/key.pem" -out "$dir/cert.pem" \
  2>/dev/null || { echo "FAIL openssl"; exit 1; }
secret=cli-test-secret-0123456789
echo "alice $secret" >"$dir/keys"
echo "$secret" >"$dir/alice.key"
start_deft_server "$server_bin" "$model" --tls_cert "$dir/cert.pem" --tls_key "$dir/key.pem" \
  --api_keys "$dir/keys"
tls=(--server "localhost:$DEFT_PORT" --tls_ca "$dir/cert.pem")
expect tls_key_file 0 "" -- "${tls[@]}" --api_key_file "$dir/alice.key" tree create "Hello"
expect tls_key_flag 0 "nodes" -- "${tls[@]}" --api_key "$secret" tree list
expect tls_no_key 1 "deftctl: ListTrees: UNAUTHENTICATED: missing authorization metadata" \
  -- "${tls[@]}" tree list
expect tls_wrong_key 1 "deftctl: ListTrees: UNAUTHENTICATED: invalid API key" \
  -- "${tls[@]}" --api_key wrong-secret-0123456789 tree list
expect plaintext_to_tls 1 "deftctl: ListTrees: UNAVAILABLE:" \
  -- --server "localhost:$DEFT_PORT" --api_key "$secret" --timeout 5 tree list
exit $fail
