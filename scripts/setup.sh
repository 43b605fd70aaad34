#!/usr/bin/env bash
# Everything a fresh machine needs: Debian packages, the build, the default model.
set -euo pipefail
here=$(dirname "$0")
bash "$here/install_deps.sh"
bash "$here/fetch_model.sh"
bash "$here/build.sh" "$@"
