# Shared settings of the set-up scripts (sourced, not run).
# DEFT_CACHE: where the model and tool venvs live (outside the repo). BUILD_DIR: the CMake build.
DEFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFT_CACHE=${DEFT_CACHE:-$HOME/.cache/deft}
BUILD_DIR=${BUILD_DIR:-$DEFT_ROOT/build}
DEFT_MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
DEFT_MODEL=${DEFT_MODEL:-$DEFT_CACHE/models/$DEFT_MODEL_FILE}
export DEFT_CACHE BUILD_DIR DEFT_MODEL
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$DEFT_ROOT}  # cache hits across clones
