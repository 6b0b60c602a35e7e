# Sourced by the scripts/gpu_*.sh runs, from the repo root, with $log set: unbuffered Python, the wheels the GPU
# machine lacks (carried in .whl/, see README) on PYTHONPATH, the GPU named at the top of the log, the build in
# place, and the step bookkeeping (stamp, finish) of the scripts that run one step after another.
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/minivllm-site .whl/*.whl
  export PYTHONPATH=/tmp/minivllm-site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$log"
failed=""  # the steps whose command failed, listed by finish
# stamp NAME, right after a step's pipeline: its time, and NAME among the failures if the step's command failed
stamp() { [ "${PIPESTATUS[0]}" = 0 ] || failed="$failed, $1"; echo "--- $1 at ${SECONDS}s" | tee -a "$log"; }
# finish, the script's last command: the run's time and its failed steps; exit status 1 if any failed
finish() { failed=${failed#, }; echo "--- done at ${SECONDS}s; failed: ${failed:-none}" | tee -a "$log"; [ -z "$failed" ]; }
# build_in_place: scripts/gpu_build.sh into $out/build.log, whose tail ends the script if it failed
build_in_place() {
  bash scripts/gpu_build.sh >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
  echo "--- built at ${SECONDS}s" | tee -a "$log"
}
