#!/usr/bin/env bash
# Set up (packages, build, default model) and start deft-server on the default model.
#   scripts/run.sh [deft-server flags...]     e.g. --listen 0.0.0.0:50051 --metrics_port 9090
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
bash "$here/setup.sh"
exec "$BUILD_DIR/bin/deft-server" --model "$DEFT_MODEL" "$@"
