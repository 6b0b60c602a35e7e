#!/usr/bin/env bash
# Build the CUDA extension in place on a GPU machine (no network, torch preinstalled):
#   scripts/gpu_build.sh    -> minivllm/_C*.so, importable from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
python3 setup.py build_ext --inplace
