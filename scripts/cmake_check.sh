#!/usr/bin/env bash
# Build the extension through CMakeLists.txt (one arch, to keep CI short) and check that the library
# loads and registers every op: the CMake path stays in step with setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${CMAKE_CHECK_ARCHS:-9.0}"
mkdir -p build
python=$(command -v python3)
# torch's CMake config links nvrtc; the CUDA wheels ship it when the toolkit does not
nvrtc=$("$python" -c "import glob, os, torch; print(next(iter(sorted(glob.glob(os.path.join(
  os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'lib', 'libnvrtc.so*')))), ''))")
cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$python" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  ${nvrtc:+-DCUDA_nvrtc_LIBRARY="$nvrtc"} -DCMAKE_BUILD_TYPE=Release >build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j "${MAX_JOBS:-2}"
"$python" - <<'PY'
import glob
import torch
library = glob.glob("build/cmake/_C*.so")[0]
torch.ops.load_library(library)
for op in ("reshape_and_cache", "flash_attn_varlen", "paged_attention_decode"):
    assert hasattr(torch.ops.minivllm, op), op
print("CMake build OK:", library)
PY
