# Sourced by the scripts/gpu_*.sh runs, from the repo root, with $log set: unbuffered Python, the wheels the GPU
# machine lacks (carried in .whl/, see README) on PYTHONPATH, and the GPU named at the top of the log.
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/minivllm-site .whl/*.whl
  export PYTHONPATH=/tmp/minivllm-site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$log"
