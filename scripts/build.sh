#!/usr/bin/env bash
# Configures and builds deft-serve into $BUILD_DIR (Release). Extra args go to cmake.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cmake -S "$DEFT_ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
  -DDEFT_TEST_MODEL="$DEFT_MODEL" "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
