#!/usr/bin/env bash
# Everything a fresh machine needs: Debian packages, the build, the default model, and the venv
# of the Python client's tests (clients/python/scripts/setup_venv.sh; a no-op when current).
set -euo pipefail
here=$(dirname "$0")
bash "$here/install_deps.sh"
bash "$here/fetch_model.sh"
bash "$here/../clients/python/scripts/setup_venv.sh"
bash "$here/build.sh" "$@"
