#!/usr/bin/env bash
# Installs the Debian packages deft-serve builds with, when any is missing. Idempotent.
set -euo pipefail
pkgs=(build-essential cmake ccache pkg-config unzip python3 python3-pip python3-venv
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
      prometheus-cpp-dev libcpp-httplib-dev nlohmann-json3-dev libgtest-dev libgmock-dev
      libbenchmark-dev prometheus)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install_deps: all packages present"
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
SUDO=""
if [[ $(id -u) != 0 ]]; then SUDO=sudo; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
