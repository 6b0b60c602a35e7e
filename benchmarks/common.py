"""Timing, ceilings and reporting shared by every benchmark: CUDA-event medians, the GPU's own copy
bandwidth measured in the same run, a terminal table and the --json dump."""

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="also write the measured rows to this JSON file")
    return p


def add_sampling_extras(p: argparse.ArgumentParser) -> None:
    """The sampling extras a benchmark can put on every request, to measure what they cost."""
    p.add_argument("--logprobs", type=int, default=None, help="SamplingParams(logprobs=K) on every request")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)


def with_sampling_extras(params: list, args: argparse.Namespace) -> tuple[list, dict]:
    """params with add_sampling_extras' arguments applied; and those arguments, by SamplingParams field."""
    extras = dict(logprobs=args.logprobs, presence_penalty=args.presence_penalty,
                  repetition_penalty=args.repetition_penalty)
    return [dataclasses.replace(sp, **extras) for sp in params], extras


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; none is visible")


def time_cuda_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 30) -> float:
    """Median milliseconds of fn() over iters launches, each timed with its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(calls: list[Callable[[], object]]) -> float:
    """Median milliseconds per call of `calls`, captured back to back in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up (and one-time setup) outside capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return time_cuda_ms(graph.replay, warmup=3, iters=20) / len(calls)


def copy_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def print_table(rows: list[dict], title: str) -> None:
    """A fixed-width table of the rows' values, columns in the order of the first row's keys."""
    if not rows:
        print(f"{title}: no rows")
        return
    columns = list(rows[0])
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def format_cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
