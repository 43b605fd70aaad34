#!/usr/bin/env bash
# Creates the venv the Python client's tests run in, $DEFT_CACHE/venv-client (override with
# DEFT_CLIENT_VENV): grpcio, grpcio-tools, protobuf, pytest and setuptools from PyPI at pinned
# versions, then deft-client built from this checkout (its stubs generated from proto/deft/v1 by
# the pinned grpcio-tools, so generated code and runtime match). Idempotent: a stamp of the pins,
# the protos and the package sources skips the work when nothing changed; any change rebuilds.
set -euo pipefail
pkg=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$pkg/../.." && pwd)
DEFT_CACHE=${DEFT_CACHE:-$HOME/.cache/deft}
venv=${DEFT_CLIENT_VENV:-$DEFT_CACHE/venv-client}
pins=(grpcio==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2 pytest==9.2.0 setuptools==84.2.1)

stamp=$( (echo "${pins[*]}"; cat "$root"/proto/deft/v1/*.proto "$pkg/pyproject.toml" \
          "$pkg/setup.py" "$pkg"/deft_client/*.py) | sha256sum | cut -d' ' -f1)
if [[ -f $venv/.deft-client-stamp && $(cat "$venv/.deft-client-stamp") == "$stamp" ]]; then
  exit 0
fi
echo "setup_venv: preparing $venv"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
# --no-build-isolation: build with the pinned grpcio-tools installed above.
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps \
  --force-reinstall "$pkg"
echo "$stamp" > "$venv/.deft-client-stamp"
