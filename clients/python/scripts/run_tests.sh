#!/usr/bin/env bash
# ctest's python_client test: prepares the venv (setup_venv.sh, a no-op when current) and runs
# the pytest suite against a deft-server it starts. Env: DEFT_SERVER_BIN (the deft-server binary,
# default build/bin/deft-server), DEFT_TEST_MODEL (the GGUF). Extra args go to pytest.
set -euo pipefail
pkg=$(cd "$(dirname "$0")/.." && pwd)
DEFT_CACHE=${DEFT_CACHE:-$HOME/.cache/deft}
venv=${DEFT_CLIENT_VENV:-$DEFT_CACHE/venv-client}
bash "$pkg/scripts/setup_venv.sh"
# Paths given relative to the caller's directory stay valid after the cd below.
for v in DEFT_SERVER_BIN DEFT_TEST_MODEL; do
  if [[ -n ${!v:-} ]]; then export "$v=$(realpath "${!v}")"; fi
done
# From tests/: the source deft_client/ (no generated stubs) must not shadow the installed one.
cd "$pkg/tests"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --import-mode=importlib . "$@"
