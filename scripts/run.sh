#!/usr/bin/env bash
# Set up (packages, build, model) and generate text with the default model on the CPU.
#   scripts/run.sh ["prompt"]
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
bash "$here/setup.sh"
prompt=${1:-"Write a haiku about trees that share their roots."}
exec "$BUILD_DIR/bin/deftctl" generate --model "$DEFT_MODEL" --prompt "$prompt" --max_tokens 128
