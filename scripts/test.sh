#!/usr/bin/env bash
# Set up (packages, build, model) and run the whole test suite. Extra args go to ctest.
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
bash "$here/setup.sh"
cd "$BUILD_DIR"
ctest --output-on-failure -j "$(nproc)" "$@"
