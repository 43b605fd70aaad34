#!/usr/bin/env bash
# bench/cpu_decode/run.sh: deft's CPU engine against llama.cpp on the same GGUF, the same prompt
# token ids and the same thread count; prints a markdown table row with both and the ratios.
#
#   bench/cpu_decode/run.sh [--model M] [--prompt-tokens 512] [--gen-tokens 128]
#                           [--threads $(nproc)] [--repeats 5]
#
# Environment: BUILD (default: build) holds bin/cpu_decode; VENV (default:
# ~/.cache/deft/venv-llama) is created with llama-cpp-python if missing (it compiles llama.cpp
# for this CPU: 10+ minutes on 2 cores). Both sides report the median of --repeats runs after a
# warm-up; the definitions of prefill and decode tok/s are in llama_cpp_bench.py's docstring.
# Ratios are deft / llama.cpp (above 1: deft is faster). Run on an otherwise idle machine: with
# --threads equal to the core count, any other load slows decode several-fold.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${DEFT_CACHE_DIR:-$HOME/.cache/deft}"
build="${BUILD:-$repo/build}"
venv="${VENV:-$cache/venv-llama}"

model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
prompt_tokens=512
gen_tokens=128
threads="$(nproc)"
repeats=5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --prompt-tokens) prompt_tokens="$2"; shift 2 ;;
    --gen-tokens) gen_tokens="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

[[ -f "$model" ]] || { echo "run.sh: no model at $model" >&2; exit 1; }
[[ -x "$build/bin/cpu_decode" ]] || {
  echo "run.sh: $build/bin/cpu_decode not built (cmake --build $build --target cpu_decode)" >&2
  exit 1
}

if ! "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "run.sh: creating $venv with llama-cpp-python (compiles llama.cpp)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q llama-cpp-python numpy
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$build/bin/cpu_decode" --model "$model" --prompt-tokens "$prompt_tokens" \
  --gen-tokens "$gen_tokens" --threads "$threads" --repeats "$repeats" --json \
  --dump-prompt-ids "$tmp/prompt_ids.txt" | grep '^{' | tail -n 1 > "$tmp/deft.json"
"$venv/bin/python" "$here/llama_cpp_bench.py" --model "$model" \
  --prompt-ids "$tmp/prompt_ids.txt" --gen-tokens "$gen_tokens" --threads "$threads" \
  --repeats "$repeats" | tail -n 1 > "$tmp/llama.json"

"$venv/bin/python" - "$tmp/deft.json" "$tmp/llama.json" "$model" <<'EOF'
import json, os, sys
deft, llama = (json.load(open(p)) for p in sys.argv[1:3])
for key in ("n_prompt", "n_gen"):
  if deft[key] != llama[key]:
    sys.exit(f"run.sh: {key} differs: deft {deft[key]}, llama.cpp {llama[key]}")
ratio = lambda key: deft[key] / llama[key]
print("| model | threads | prompt | gen | deft prefill tok/s | llama.cpp prefill tok/s | ratio "
      "| deft decode tok/s | llama.cpp decode tok/s | ratio | llama-cpp-python |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| {os.path.basename(sys.argv[3])} | {deft['threads']} | {deft['n_prompt']} "
      f"| {deft['n_gen']} | {deft['prefill_tok_s']:.1f} | {llama['prefill_tok_s']:.1f} "
      f"| {ratio('prefill_tok_s'):.2f} | {deft['decode_tok_s']:.1f} | {llama['decode_tok_s']:.1f} "
      f"| {ratio('decode_tok_s'):.2f} | {llama['llama_cpp_python']} |")
EOF
