"""Online serving over HTTP: starts `minivllm serve` on a loopback port and replays nano-vllm's throughput workload
(benchmarks/workload.py) through streaming clients, first all at once (maximum concurrency), then arriving at a
Poisson rate (by default half the requests/s the first run reached). Reports time to first token, time per output
token and inter-token latency (p50, p99) and output tokens/s, beside the offline engine's tokens/s on the same
requests with the same engine settings, measured first in the same run (`LLM.generate`, in a process of its own
that has exited, memory and all, before the server starts). Also the host's CPU time per output token (Linux):
proc_cpu_us_tok for the server's process (the offline run's process on the offline row), child_cpu_us_tok for its
child processes (the engine process, which AsyncLLM starts): what the front end costs, apart from the engine; and
client_cpu_us_tok for the clients, which run in --client-procs processes so that reading the streams in Python
does not set the pace.

python -m benchmarks.serving [--model qwen3-0.6b] [--num-prompts 256] [--request-rate R] [--client-procs N]
                             [--no-poisson] [--json PATH]
A CPU smoke run: --model DIR --device cpu --num-prompts 4 --max-input-len 100 --max-output-len 100
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx

from benchmarks.common import gpu_name, parser, print_table, write_json
from benchmarks.workload import nano_vllm_workload
from minivllm.entrypoints.launcher import ServerProcess


@dataclass
class Timing:
    start: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    end: float = 0.0  # the response read to its end


async def one_request(client: httpx.AsyncClient, url: str, ids: list[int], params) -> Timing:
    body = {"prompt": ids, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "ignore_eos": params.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    timing = Timing(time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                timing.token_times.append(time.perf_counter())
            if chunk.get("usage"):
                timing.num_tokens = chunk["usage"]["completion_tokens"]
    timing.end = time.perf_counter()
    return timing


async def replay_share(url: str, jobs: list[tuple[float, list[int], object]], start_at: float) -> list[Timing]:
    """One client process's share of the requests, each sent `offset` seconds after `start_at` (perf_counter is
    CLOCK_MONOTONIC on Linux: one clock for every process of the machine)."""
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        for offset, ids, sp in jobs:
            await asyncio.sleep(max(0.0, start_at + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, url, ids, sp)))
        return await asyncio.gather(*tasks)


def client_process(url: str, jobs: list, start_at: float) -> tuple[list[Timing], float]:
    """Runs in a pool worker: (its requests' timings, its CPU seconds)."""
    cpu = time.process_time()
    timings = asyncio.run(replay_share(url, jobs, start_at))
    return timings, time.process_time() - cpu


def replay(pool: ProcessPoolExecutor, clients: int, url: str, prompts: list, params: list,
           rate: float | None, seed: int = 0) -> tuple[list[Timing], float, float]:
    """Every request (rate None: all at once; else Poisson arrivals at rate a second), dealt round-robin to
    `clients` processes so that parsing the streams in Python does not bound what is measured: (timings, seconds
    from the first send to the last token, the clients' CPU seconds)."""
    gaps, offset, jobs = random.Random(seed), 0.0, []
    for ids, sp in zip(prompts, params):
        jobs.append((offset, ids, sp))
        if rate is not None:
            offset += gaps.expovariate(rate)
    start_at = time.perf_counter() + 0.5  # time for every worker to receive its share
    shares = [pool.submit(client_process, url, jobs[i::clients], start_at) for i in range(clients)]
    results = [share.result() for share in shares]
    timings = [t for share, _ in results for t in share]
    return timings, max(t.end for t in timings) - start_at, sum(cpu for _, cpu in results)


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, every thread's, user and system (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of the server's process and of its children together."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(child) for child in f.read().split()]
    return cpu_seconds(pid), sum(cpu_seconds(child) for child in children)


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), cuts[98]


def summary(name: str, timings: list[Timing], elapsed: float, rate: float | None) -> dict:
    ttft = [(t.token_times[0] - t.start) * 1e3 for t in timings if t.token_times]
    tpot = [(t.token_times[-1] - t.token_times[0]) * 1e3 / (t.num_tokens - 1) for t in timings if t.num_tokens > 1]
    itl = [(b - a) * 1e3 for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(t.num_tokens for t in timings)
    row = {"run": name, "rate_req_s": rate, "requests": len(timings), "seconds": elapsed, "output_tokens": tokens,
           "output_tok_s": tokens / elapsed}
    for label, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        row[f"{label}_p50"], row[f"{label}_p99"] = percentiles(values)
    return row


def offline_run(model: str, engine_kwargs: dict, prompts: list, params: list) -> tuple[int, float, float]:
    """The requests through LLM.generate after a warm-up request: (output tokens, seconds, CPU seconds)."""
    from minivllm import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=4), use_tqdm=False)
    start, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    llm.shutdown()
    return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed, cpu


def engine_flags(engine_kwargs: dict) -> list[str]:
    """The engine's settings as `minivllm serve` flags."""
    flags = []
    for name, value in engine_kwargs.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals a second (default: half the maximum-concurrency run's requests/s)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                   help="client processes the requests are dealt to (default: a quarter of the CPUs, at most 4)")
    p.add_argument("--poisson", action=argparse.BooleanOptionalAction, default=True,
                   help="after maximum concurrency, a run at a Poisson rate")
    args = p.parse_args()

    prompts, params = nano_vllm_workload(args.num_prompts, args.max_input_len, args.max_output_len)
    engine_kwargs = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                     "device": args.device, "num_kv_blocks": args.num_kv_blocks, "enforce_eager": args.enforce_eager}
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v not in (None, False)}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        tokens, elapsed, cpu = pool.submit(offline_run, args.model, engine_kwargs, prompts, params).result()
    offline = {"run": "offline (LLM.generate)", "requests": len(prompts), "seconds": elapsed, "output_tokens": tokens,
               "output_tok_s": tokens / elapsed, "proc_cpu_us_tok": cpu / tokens * 1e6, "child_cpu_us_tok": 0.0}
    flags = [*engine_flags(engine_kwargs), "--max-pending-requests", str(max(1024, 2 * args.num_prompts)),
             "--log-level", "warning"]
    server = ServerProcess(args.model, *flags, timeout=600)
    clients = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    try:
        warm = max(2, args.client_procs)  # a request for every client process: each starts its worker
        replay(clients, args.client_procs, server.url, prompts[:warm], params[:warm], None)
        rows, rate = [], None
        for name in ("max concurrency", "poisson")[: 2 if args.poisson else 1]:
            cpu = server_cpu(server.proc.pid)
            timings, elapsed, client_cpu = replay(clients, args.client_procs, server.url, prompts, params, rate)
            row = summary(name, timings, elapsed, rate)
            for key, before, after in zip(("proc_cpu_us_tok", "child_cpu_us_tok"), cpu, server_cpu(server.proc.pid)):
                row[key] = (after - before) / row["output_tokens"] * 1e6
            row["client_cpu_us_tok"] = client_cpu / row["output_tokens"] * 1e6
            rows.append(row)
            rate = args.request_rate or 0.5 * len(prompts) / elapsed
    finally:
        clients.shutdown()
        server.kill()
    rows.insert(0, {**dict.fromkeys(rows[0]), **offline})  # the same columns, latencies left empty
    for row in rows:
        row["of_offline"] = row["output_tok_s"] / offline["output_tok_s"]
    expected = sum(sp.max_tokens for sp in params)
    for row in rows:
        assert row["output_tokens"] == expected, f"{row['run']}: {row['output_tokens']} tokens, expected {expected}"
    print_table(rows, f"benchmarks.serving on {gpu_name()}: {args.model}, {len(prompts)} requests over HTTP")
    write_json(args.json, {"device": gpu_name(), "model": args.model, "num_prompts": len(prompts), "rows": rows})


if __name__ == "__main__":
    main()
