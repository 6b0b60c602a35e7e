#!/usr/bin/env bash
# Build the CUDA extension in place on a GPU machine (no network, torch preinstalled):
#   scripts/gpu_build.sh    -> minivllm/_C*.so, importable from the repo root.
# Every object and the link must come from one host compiler: where CC names another gcc than the
# default (nvcc then uses it through -ccbin while the link uses the default g++), the two libstdc++
# builds meet in one library and TORCH_CHECK's message formatting crashed. So the g++ beside $CC is
# used for C++ too, and if that library still fails the check below, the build is redone with the
# default compiler alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

formats_errors() {  # a failed TORCH_CHECK whose message holds an integer must raise, not crash
  python3 - <<'PY'
import torch
import minivllm.ops  # noqa: F401
q = torch.zeros(1, 1, 96, dtype=torch.float16, device="cuda")
cache = torch.zeros(1, 16, 1, 96, dtype=torch.float16, device="cuda")
ints = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
try:
    torch.ops.minivllm.paged_attention_decode(q, cache, cache, ints, ints[0], 1.0)
except RuntimeError as e:
    print("error formatting OK:", str(e).splitlines()[0][:100])
PY
}

if [ -n "${CC:-}" ] && [ -x "${CC%gcc}g++" ]; then
  export CXX="${CC%gcc}g++"
fi
echo "host compilers: CC=${CC:-default} CXX=${CXX:-default}"
python3 setup.py build_ext --inplace
if ! formats_errors; then
  echo "the extension crashed formatting an error; rebuilding with the default host compiler alone"
  rm -rf build minivllm/_C*.so
  env -u CC -u CXX python3 setup.py build_ext --inplace
  formats_errors
fi
