"""Where a decode step's time goes on the throughput workload: host time per phase of the engine's step,
and, over a torch.profiler window of decode steps, the GPU's busy time, split into attention, matrix products and
the rest, and its kernels by total time.

python -m benchmarks.step_profile [--num-seqs 256] [--skip 100] [--steps 30] [--context N] [--json PATH]
                                  [--logprobs K] [--presence-penalty X] [--repetition-penalty X] [--cprofile PATH]
"""

import contextlib
import cProfile
import pstats
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    add_sampling_extras,
    gpu_name,
    parser,
    print_table,
    require_cuda,
    with_sampling_extras,
    write_json,
)
from benchmarks.workload import nano_vllm_workload
from minivllm import LLM, SamplingParams
from minivllm.sampling_params import RequestOutputKind


class StepClock:
    """Wraps the engine's scheduler, executor and collect to time each decode step's phases on the host: schedule,
    launch, then waiting for the step before to finish on the GPU and collecting its tokens (stop checks, outputs,
    logprobs)."""

    def __init__(self, engine):
        self.phases: dict[str, float] = defaultdict(float)
        self.decode_steps = 0
        self.launch_ends: list[float] = []  # when each step's launch returned, decode and prefill
        self.last_was_decode = False
        self.schedule, self.execute, self.collect = engine.scheduler.schedule, engine.executor.execute, engine.collect
        engine.scheduler.schedule, engine.executor.execute = self.timed_schedule, self.timed_execute
        engine.collect = self.timed_collect

    def timed_schedule(self):
        start = time.perf_counter()
        batch = self.schedule()
        self.last_schedule = time.perf_counter() - start
        return batch

    def timed_collect(self, step):
        start = time.perf_counter()
        if step.launched.done is not None:
            step.launched.done.synchronize()
        waited = time.perf_counter()
        outputs = self.collect(step)
        if self.last_was_decode:  # collecting the decode step before this one
            self.phases["GPU wait"] += waited - start
            self.phases["collect"] += time.perf_counter() - waited
        return outputs

    def timed_execute(self, step):
        start = time.perf_counter()
        launched = self.execute(step)
        self.launch_ends.append(time.perf_counter())
        self.last_was_decode = not step.is_prefill
        if self.last_was_decode:
            self.decode_steps += 1
            self.phases["schedule"] += self.last_schedule
            self.phases["launch"] += time.perf_counter() - start
        return launched


@dataclass(frozen=True)
class KernelTimes:
    """A profiled window's GPU time per kernel (and memcpy/memset) name, in microseconds: `us` its kernels' whole
    durations; `exposed_us` what they add to the GPU's busy span past the kernels that started before them. Under
    programmatic dependent launch a kernel starts early and waits inside for the one before it, so its duration
    counts time another kernel also covers; the exposed times sum to the span the GPU was busy."""

    us: dict[str, float]
    exposed_us: dict[str, float]
    calls: dict[str, int]


def kernel_times_us(prof: profile) -> KernelTimes:
    """The window's KernelTimes, from the profiler's GPU events in the order they started."""
    us: dict[str, float] = defaultdict(float)
    exposed: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    covered_until = float("-inf")  # the end of the latest-ending event so far
    for event in events:
        start, end = event.time_range.start, event.time_range.end
        us[event.name] += end - start
        exposed[event.name] += max(0.0, end - max(start, covered_until))
        calls[event.name] += 1
        covered_until = max(covered_until, end)
    return KernelTimes(dict(us), dict(exposed), dict(calls))


ATTENTION_KERNELS = ("paged_decode", "prefill")  # ours: paged decode (which merges its splits), prefill
KERNEL_KINDS = ("attention", "matmul", "rest")
MATMUL_KERNELS = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitkreduce", "small_m_linear")


def kernel_kind(name: str) -> str:
    """'attention', 'matmul' (cuBLAS's and our small-M matrix products) or 'rest', from a profiled kernel's name."""
    lowered = name.lower()
    if any(part in lowered for part in ATTENTION_KERNELS):
        return "attention"
    if any(part in lowered for part in MATMUL_KERNELS):
        return "matmul"
    return "rest"


def time_by_kind(kernels_us: dict[str, float]) -> dict[str, float]:
    """Kernel times summed by kernel_kind, every kind present."""
    totals = dict.fromkeys(KERNEL_KINDS, 0.0)
    for name, us in kernels_us.items():
        totals[kernel_kind(name)] += us
    return totals


@dataclass(frozen=True)
class Window:
    """Consecutive decode steps run under torch.profiler, the GPU drained at both ends. Its wall time runs from its
    first step's launch (the pipeline refilling after the drain is not a step's cost) to the GPU's end of its last."""

    first_step: int  # decode steps before it
    decode_steps: int
    prefill_steps: int  # a preempted sequence's prompt again, or chunks of a late one
    batch: int  # sequences running when it began
    wall_ms: float
    kernels: KernelTimes


def profile_run(engine, clock: StepClock, prompts: list[list[int]], params: list[SamplingParams],
                starts: list[int], steps: int) -> list[Window]:
    """Runs the requests to the end, profiling `steps` decode steps from each decode-step index in `starts`: a window
    opens after the first decode step at or past a start (so never over the first prefill), once for all the starts
    passed while another was open; a window the run cuts short is kept as it is. Requests ask for their final output
    only, as LLM.generate's do (an output of every request every step, with its text decoded as it grows, took about
    3 s of the host's 10 in a run under cProfile on the H200)."""
    for i, (ids, sp) in enumerate(zip(prompts, params)):
        final = replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request(f"profile-{i}", {"prompt_token_ids": ids}, final)
    windows: list[Window] = []
    pending = sorted(starts)
    opened = None  # the open window's profiler, decode steps and steps before it, batch
    while True:
        unfinished = engine.has_unfinished_requests()
        if opened is not None and (not unfinished or clock.decode_steps == opened[1] + steps):
            torch.cuda.synchronize()
            prof, first_step, first_total, batch = opened
            launches = clock.launch_ends[first_total:]
            wall_ms = (time.perf_counter() - launches[0]) * 1e3 if launches else 0.0
            prof.stop()
            decode_steps = clock.decode_steps - first_step
            windows.append(Window(first_step, decode_steps, len(launches) - decode_steps, batch, wall_ms,
                                  kernel_times_us(prof)))
            opened = None
        if not unfinished:
            return windows
        if opened is None and pending and pending[0] <= clock.decode_steps and clock.last_was_decode:
            pending = [s for s in pending if s > clock.decode_steps]  # starts passed meanwhile: this one window
            torch.cuda.synchronize()
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
            opened = (prof, clock.decode_steps, len(clock.launch_ends), len(engine.scheduler.running))
        step_start = time.perf_counter()
        clock.last_was_decode = False
        engine.step()
        if clock.last_was_decode:
            clock.phases["whole step"] += time.perf_counter() - step_start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--skip", type=int, default=100, help="decode steps before the profiled window")
    p.add_argument("--steps", type=int, default=30, help="decode steps in the profiled window")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--context", type=int, help="instead of the workload: --num-seqs prompts of this many tokens")
    p.add_argument("--cprofile", metavar="PATH", help="run under cProfile and write the host's hottest functions "
                   "(by own time, then by cumulative time) to PATH")
    add_sampling_extras(p)
    args = p.parse_args()
    require_cuda()
    llm = LLM(args.model, max_model_len=4096)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4), use_tqdm=False)
    engine = llm.llm_engine
    clock = StepClock(engine)
    if args.context:
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 20000) for _ in range(args.context)] for _ in range(args.num_seqs)]
        length = args.skip + args.steps + 2
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=length)] * len(prompts)
    else:
        prompts, params = nano_vllm_workload(args.num_seqs)
    params, _ = with_sampling_extras(params, args)
    # a graph torch.compile makes mid-run is tuned at that step's batch and kept for every later one: say so, and why
    torch._logging.set_logs(recompiles=True)
    graphs_before = counters["stats"]["unique_graphs"]
    host_profile = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    with host_profile or contextlib.nullcontext():
        windows = profile_run(engine, clock, prompts, params, [args.skip], args.steps)
    total = time.perf_counter() - start
    compiled = counters["stats"]["unique_graphs"] - graphs_before
    if host_profile is not None:
        with open(args.cprofile, "w") as f:
            stats = pstats.Stats(host_profile, stream=f)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(60)
    if not windows or windows[0].decode_steps < args.steps:
        raise SystemExit(f"the workload ran only {clock.decode_steps} decode steps; lower --skip/--steps")
    window = windows[0]

    times, batch_size = window.kernels, window.batch
    busy_ms = sum(times.us.values()) / 1e3 / args.steps
    span_ms = sum(times.exposed_us.values()) / 1e3 / args.steps
    wall_ms = window.wall_ms / args.steps
    by_kind = {kind: us / 1e3 / args.steps for kind, us in time_by_kind(times.us).items()}
    exposed_by_kind = {kind: us / 1e3 / args.steps for kind, us in time_by_kind(times.exposed_us).items()}
    rows = [
        {"kernel": name[:70], "us_per_step": us / args.steps,
         "exposed_us_per_step": times.exposed_us[name] / args.steps, "calls_per_step": times.calls[name] / args.steps,
         "share_of_gpu": us / sum(times.us.values())}
        for name, us in sorted(times.us.items(), key=lambda kv: -kv[1])[: args.top]
    ]
    host = {name: seconds * 1e3 / clock.decode_steps for name, seconds in clock.phases.items()}
    print(f"GPU {gpu_name()}; {args.num_seqs} requests in {total:.2f} s, {clock.decode_steps} decode steps, "
          f"{compiled} graphs compiled by torch.compile during the run")
    print(f"window: {args.steps} decode steps after {args.skip}, batch {batch_size}: wall {wall_ms:.3f} ms/step, "
          f"GPU busy {busy_ms:.3f} ms/step ({busy_ms / wall_ms:.0%}) summed over kernels, "
          f"{span_ms:.3f} ms/step ({span_ms / wall_ms:.0%}) as a span (overlaps counted once)")
    print("GPU ms per decode step in the window: " + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items()))
    print("of which exposed (past the kernels before): "
          + ", ".join(f"{k} {v:.3f}" for k, v in exposed_by_kind.items()))
    print("host ms per decode step, whole run: " + ", ".join(f"{k} {v:.3f}" for k, v in host.items()))
    print_table(rows, "GPU time by kernel in the window")
    write_json(args.json, {"gpu": gpu_name(), "batch": batch_size, "graphs_compiled": compiled,
                           "wall_ms_per_step": wall_ms, "gpu_busy_ms_per_step": busy_ms,
                           "gpu_span_ms_per_step": span_ms, "host_ms_per_step": host, "kernels": rows,
                           "gpu_ms_per_step_by_kind": by_kind,
                           "exposed_gpu_ms_per_step_by_kind": exposed_by_kind})


if __name__ == "__main__":
    main()
