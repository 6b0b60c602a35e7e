"""AsyncLLM on the CPU: concurrent streams equal the offline outputs, deltas add up (merged for a consumer that
lags), leaving a stream aborts its request and frees its blocks, an engine failure or the engine process's death
reaches every stream, the engine process ends with its parent, bad requests raise in the caller, start-up errors
are LLM's, and the engine process sleeps while idle. The engine runs in a process of its own, so every check reads
what a caller sees: outputs, errors and AsyncLLM's readings. Every wait is bounded, so a bug fails a test instead of
hanging it."""

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

import minivllm
from minivllm import AsyncLLM, RequestOutputKind, SamplingParams
from minivllm.async_llm import EngineDeadError
from minivllm.engine.llm_engine import EngineStats
from tests.conftest import FAILING_STEP_PRELUDE, LLM, random_prompts, token_prompts

SETTINGS = dict(device="cpu", max_model_len=128, max_num_seqs=16)
TIMEOUT = 60  # seconds for a whole test's requests on a loaded 2-core machine
LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


def run(coro, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def make_engine():
    """AsyncLLM(model, **SETTINGS | overrides); every one made is shut down after the test."""
    engines = []

    def make(model: str, **overrides) -> AsyncLLM:
        engines.append(AsyncLLM(model, **{**SETTINGS, **overrides}))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture(scope="module")
def shared_engine(qwen3_dir):
    """One AsyncLLM(qwen3_dir, **SETTINGS) for the tests that leave it serving (an engine process takes seconds to
    start)."""
    engine = AsyncLLM(qwen3_dir, **SETTINGS)
    yield engine
    engine.shutdown()


@functools.lru_cache
def offline(model: str, **overrides) -> minivllm.LLM:
    return LLM(model, **{**SETTINGS, **overrides})


async def collect(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str) -> list:
    return [out async for out in engine.generate(prompt, params, request_id)]


async def wait_until(condition, timeout: float = 10.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def idle_and_free(engine: AsyncLLM) -> bool:
    """Nothing runs or waits, and every KV block is free (as of the engine's last step)."""
    return engine.num_running_seqs == engine.num_waiting_seqs == 0 and engine.kv_cache_usage == 0


def core_process() -> multiprocessing.Process:
    """The engine process of the one AsyncLLM alive."""
    (process,) = [p for p in multiprocessing.active_children() if p.name == "minivllm-engine-core"]
    return process


def check_stream(outs: list, expected) -> None:
    """A cumulative stream: each output extends the last by at least one token (more when the consumer lagged),
    finished only at the end, ending where the offline run ended."""
    tokens = [out.outputs[0].token_ids for out in outs]
    assert all(len(a) < len(b) and b[: len(a)] == a for a, b in zip(tokens, tokens[1:]))
    assert tokens[0]
    assert [out.finished for out in outs] == [False] * (len(outs) - 1) + [True]
    final, want = outs[-1].outputs[0], expected.outputs[0]
    assert (final.token_ids, final.text, final.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    assert outs[-1].prompt_token_ids == expected.prompt_token_ids


# ----- outputs -----------------------------------------------------------------------------------------------
def test_concurrent_generators_equal_offline(tokenizer_model_dir, make_engine):
    """32 greedy streams of mixed lengths, half of them started while the others run, text and token prompts."""
    texts = [f"Request {i}: tell me about the number {i * 7}" for i in range(16)]
    prompts = texts + token_prompts(random_prompts(16, 3, 40, seed=3, vocab=150000))
    params = [SamplingParams(temperature=0.0, max_tokens=1 + (i * 5) % 24) for i in range(32)]
    expected = offline(tokenizer_model_dir).generate(prompts, params, use_tqdm=False)
    engine = make_engine(tokenizer_model_dir)

    async def main():
        first = [asyncio.create_task(collect(engine, p, sp, f"r{i}")) for i, (p, sp) in
                 enumerate(zip(prompts[:16], params[:16]))]
        await wait_until(lambda: engine.stats.generation_tokens >= 8)  # arrivals join a running batch
        assert engine.num_running_seqs > 0
        later = [asyncio.create_task(collect(engine, p, sp, f"r{i + 16}")) for i, (p, sp) in
                 enumerate(zip(prompts[16:], params[16:]))]
        return await asyncio.gather(*first, *later)

    streams = run(main())
    for i, (outs, want) in enumerate(zip(streams, expected)):
        assert outs[-1].request_id == f"r{i}"
        check_stream(outs, want)
    assert any(out.outputs[0].text for outs in streams for out in outs)  # the text was really compared


def test_delta_outputs_concatenate_to_cumulative(tokenizer_model_dir, make_engine):
    prompts = [f"Once upon a time, story {i}" for i in range(8)]
    params = [SamplingParams(temperature=0.0, max_tokens=10 + 2 * i, stop=["zq"] if i % 2 else None)
              for i in range(8)]
    engine = make_engine(tokenizer_model_dir)

    async def main():
        cumulative = [collect(engine, p, sp, f"c{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
        deltas = [collect(engine, p, replace(sp, output_kind=RequestOutputKind.DELTA), f"d{i}")
                  for i, (p, sp) in enumerate(zip(prompts, params))]
        return await asyncio.gather(asyncio.gather(*cumulative), asyncio.gather(*deltas))

    cumulative, deltas = run(main())
    for full, parts in zip(cumulative, deltas):
        final = full[-1].outputs[0]
        assert all(out.outputs[0].token_ids for out in parts)
        assert [tok for out in parts for tok in out.outputs[0].token_ids] == final.token_ids
        assert "".join(out.outputs[0].text for out in parts) == final.text
        assert parts[-1].finished and parts[-1].outputs[0].finish_reason == final.finish_reason
    assert all(full[-1].outputs[0].text for full in cumulative)


def test_a_lagging_consumer_gets_the_outputs_it_missed_merged(tokenizer_model_dir, make_engine):
    """A consumer that takes its outputs slower than the engine makes them: the engine does not wait for it, and
    each output it gets merges the steps it missed: deltas (text, token ids, logprobs) concatenate to the offline
    output, and a cumulative stream's newest output says everything."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    want = offline(tokenizer_model_dir).generate("A slow reader", params, use_tqdm=False)[0].outputs[0]
    engine = make_engine(tokenizer_model_dir)

    async def slow(kind: RequestOutputKind, request_id: str) -> list:
        outs = []
        async for out in engine.generate("A slow reader", replace(params, output_kind=kind), request_id):
            outs.append(out)
            await asyncio.sleep(0.2)  # the whole request takes the engine far less on this model
        return outs

    async def main():
        return await asyncio.gather(slow(RequestOutputKind.DELTA, "delta"),
                                    slow(RequestOutputKind.CUMULATIVE, "cumulative"))

    deltas, cumulative = run(main())
    for outs in deltas, cumulative:
        assert len(outs) < 12 and [out.finished for out in outs] == [False] * (len(outs) - 1) + [True]
    pieces = [out.outputs[0] for out in deltas]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in pieces)
    assert [t for c in pieces for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in pieces) == want.text and want.text
    got = [entry for c in pieces for entry in c.logprobs]
    assert [e[t].logprob for e, t in zip(got, want.token_ids)] == pytest.approx(
        [e[t].logprob for e, t in zip(want.logprobs, want.token_ids)], abs=1e-5)
    assert pieces[-1].finish_reason == "length" and pieces[-1].cumulative_logprob == pytest.approx(
        want.cumulative_logprob, abs=1e-4)
    final = cumulative[-1].outputs[0]
    assert (final.token_ids, final.text, final.finish_reason) == (want.token_ids, want.text, "length")
    assert all(out.prompt == "A slow reader" and out.prompt_token_ids for out in deltas + cumulative)


def test_the_engine_process_runs_tensor_parallel_workers(qwen3_dir, make_engine):
    """The engine process starts tensor-parallel workers of its own (so it is not daemonic): greedy streams at
    tensor_parallel_size 2 equal the single-process offline run (fp32), and shutdown() stops it all."""
    prompts = token_prompts(random_prompts(4, 5, 20, seed=11))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = offline(qwen3_dir).generate(prompts, params, use_tqdm=False)
    engine = make_engine(qwen3_dir, tensor_parallel_size=2)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params, f"tp{i}") for i, p in enumerate(prompts)))

    for outs, want in zip(run(main()), expected):
        check_stream(outs, want)
    engine.shutdown()
    assert not [p for p in multiprocessing.active_children() if p.name == "minivllm-engine-core"]


# ----- leaving early -----------------------------------------------------------------------------------------
def test_leaving_a_stream_aborts_it_and_frees_its_blocks(qwen3_dir, make_engine):
    """break, aclose(), a cancelled task and abort() each stop their request mid-run, while the other requests
    (one reusing the id left by aclose() at once) finish as offline; at the end every block is free. The leavers
    may run to 200 tokens: the engine's token count shows that none of them did."""
    prompts = random_prompts(10, 5, 20, seed=5)
    expected = offline(qwen3_dir).generate(token_prompts(prompts), LONG, use_tqdm=False)
    engine = make_engine(qwen3_dir, max_model_len=256)
    leaver = replace(LONG, max_tokens=200)

    async def broken_off(prompt, request_id: str) -> int:
        seen = 0
        async for _ in engine.generate(prompt, leaver, request_id):
            seen += 1
            if seen == 3:
                break
        return seen

    async def cancelled(prompt) -> None:
        two = asyncio.Event()

        async def consume():
            async for out in engine.generate(prompt, leaver, "cancel"):
                if len(out.outputs[0].token_ids) >= 2:
                    two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(two.wait(), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def main():
        others = [asyncio.create_task(collect(engine, {"prompt_token_ids": p}, LONG, f"keep{i}"))
                  for i, p in enumerate(prompts[5:])]
        assert await broken_off({"prompt_token_ids": prompts[0]}, "break") == 3
        stream = engine.generate({"prompt_token_ids": prompts[1]}, leaver, "aclose")
        await anext(stream)
        await stream.aclose()
        reused = asyncio.create_task(collect(engine, {"prompt_token_ids": prompts[4]}, LONG, "aclose"))
        await cancelled({"prompt_token_ids": prompts[2]})
        explicit = []
        async for out in engine.generate({"prompt_token_ids": prompts[3]}, leaver, "explicit"):
            explicit.append(out)
            if len(explicit) == 2:
                await engine.abort(["explicit", "unknown"])
        results = explicit, await reused, await asyncio.gather(*others)
        # the front end forgets each request once its last delta came, whether or not its caller was still there
        await wait_until(lambda: idle_and_free(engine) and not engine._outputs.requests)
        return results

    explicit, reused, others = run(main())
    assert explicit[-1].finished and explicit[-1].outputs[0].finish_reason == "abort"
    assert not any(out.finished for out in explicit[:-1])
    check_stream(reused, expected[4])
    for outs, want in zip(others, expected[5:]):
        check_stream(outs, want)
    # the six that finished made 100 tokens each; any one leaver that ran on to its end would alone make 200
    left_early = engine.stats.generation_tokens - 6 * LONG.max_tokens
    assert 0 < left_early < leaver.max_tokens, left_early


def test_idle_engine_sleeps_and_wakes_at_once(qwen3_dir, make_engine):
    """The engine process takes no CPU while nothing runs (it sleeps on its command pipe), before a request and
    after it."""
    engine = make_engine(qwen3_dir)
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        with open(f"/proc/{core_process().pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    async def main():
        await asyncio.sleep(0.2)
        before = cpu_seconds()
        await asyncio.sleep(1.0)
        idle = cpu_seconds() - before
        start = time.perf_counter()
        outs = await collect(engine, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=1), "wake")
        latency = time.perf_counter() - start
        await asyncio.sleep(0.2)  # the engine's last loop turns after the request finished
        before = cpu_seconds()
        await asyncio.sleep(1.0)
        return idle, latency, outs, cpu_seconds() - before

    idle, latency, outs, idle_after = run(main())
    assert idle <= 0.05 and idle_after <= 0.05  # a loop that polled would take about the whole second
    assert latency < 2.0 and outs[-1].finished


def test_server_readings(qwen3_dir, make_engine):
    engine = make_engine(qwen3_dir)

    async def main():
        readings = []
        async for out in engine.generate({"prompt_token_ids": list(range(2, 40))}, LONG, "read"):
            if not readings and len(out.outputs[0].token_ids) >= 2:
                readings = [engine.kv_cache_usage, engine.num_running_seqs + engine.num_waiting_seqs]
        await wait_until(lambda: idle_and_free(engine))
        return readings, out

    (usage, seqs), last = run(main())
    assert 0 < usage < 1 and seqs == 1
    assert (engine.kv_cache_usage, engine.num_running_seqs, engine.num_waiting_seqs) == (0.0, 0, 0)
    assert last.outputs[0].finish_reason == "length"  # at max_model_len: 128 - 38 tokens
    assert engine.stats == EngineStats(prompt_tokens=38, generation_tokens=128 - 38)
    assert engine.tokenizer is None and engine.max_model_len == 128 and engine.is_running


# ----- failures ----------------------------------------------------------------------------------------------
# A script as a user would write one, whose engine step fails on demand (conftest.FAILING_STEP_PRELUDE).
FAILING_STEP = FAILING_STEP_PRELUDE + """

async def main(engine):
    from minivllm import SamplingParams
    from minivllm.async_llm import EngineDeadError
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    async def collect(i):
        return [o async for o in engine.generate({"prompt_token_ids": [3 + i, 4, 5]}, params, f"f{i}")]
    streams = [asyncio.create_task(collect(i)) for i in range(8)]
    while engine.stats.generation_tokens < 4:
        await asyncio.sleep(0.005)
    open(os.environ["MINIVLLM_TEST_FAIL"], "w").close()
    errors = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 10)
    try:
        await anext(engine.generate({"prompt_token_ids": [3, 4]}, params, "late"))
        late = None
    except EngineDeadError as e:
        late = str(e)
    return {"errors": [[type(e).__name__, str(e), "failing_step" in str(e.__cause__)] for e in errors],
            "late": late, "running": engine.is_running}

if __name__ == "__main__":
    from minivllm import AsyncLLM
    engine = AsyncLLM(sys.argv[1], device="cpu", max_model_len=128, max_num_seqs=4)
    result = asyncio.run(asyncio.wait_for(main(engine), 60))
    engine.shutdown()
    engine.shutdown()  # idempotent
    print(json.dumps(result))
"""


def test_engine_failure_reaches_every_generator(qwen3_dir, tmp_path):
    """Four requests run and four wait (max_num_seqs=4) when a step raises in the engine process: all eight raise
    that error, with the engine's traceback as its cause; later requests get EngineDeadError."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_STEP)
    done = subprocess.run([sys.executable, str(script), qwen3_dir], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINIVLLM_TEST_FAIL": str(tmp_path / "fail"), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["errors"] == [["RuntimeError", "injected step failure", True]] * 8
    assert "injected step failure" in result["late"] and result["running"] is False


def test_a_dead_engine_process_fails_every_generator(qwen3_dir, make_engine):
    """The engine process killed mid-run (the OOM killer, a crash in native code): every pending generator and every
    later request raises EngineDeadError naming its exit; nothing hangs."""
    engine = make_engine(qwen3_dir, max_num_seqs=4)

    async def main():
        streams = [asyncio.create_task(collect(engine, {"prompt_token_ids": p}, LONG, f"d{i}"))
                   for i, p in enumerate(random_prompts(8, 5, 20, seed=8))]
        await wait_until(lambda: engine.stats.generation_tokens >= 4)
        os.kill(core_process().pid, signal.SIGKILL)
        errors = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 15)
        with pytest.raises(EngineDeadError, match="died"):
            await anext(engine.generate({"prompt_token_ids": [3, 4]}, LONG, "late"))
        return errors

    errors = run(main())
    assert all(isinstance(e, EngineDeadError) and "exit code -9" in str(e) for e in errors), errors
    assert not engine.is_running


@pytest.mark.parametrize("max_tokens", [2, 100])
def test_the_engine_process_ends_with_its_parent(qwen3_dir, tmp_path, max_tokens):
    """A parent killed without a word (SIGKILL: no shutdown, no atexit) leaves no engine process holding the
    device, whether the engine was idle (it sees its command pipe close) or running a request (its outputs pipe
    breaks too)."""
    script = tmp_path / "parent.py"
    script.write_text("""import asyncio, multiprocessing, sys
from minivllm import AsyncLLM, SamplingParams
async def main(engine):
    params = SamplingParams(max_tokens=int(sys.argv[2]), ignore_eos=True)
    async for out in engine.generate({"prompt_token_ids": [3, 4, 5]}, params, "long"):
        if len(out.outputs[0].token_ids) >= 2:
            core = [p for p in multiprocessing.active_children() if p.name == "minivllm-engine-core"][0]
            print(core.pid, flush=True)
            await asyncio.sleep(600)
if __name__ == "__main__":
    asyncio.run(main(AsyncLLM(sys.argv[1], device="cpu", max_model_len=128)))
""")
    parent = subprocess.Popen([sys.executable, str(script), qwen3_dir, str(max_tokens)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        core_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(timeout=10)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie has stopped
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 15
    while alive(core_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(core_pid)


def test_shutdown_fails_pending_generators(qwen3_dir, make_engine):
    engine = make_engine(qwen3_dir)

    async def main():
        stream = engine.generate({"prompt_token_ids": [5, 6, 7]}, LONG, "pending")
        await anext(stream)
        engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect_rest(stream), 5)
        with pytest.raises(EngineDeadError):
            await anext(engine.generate({"prompt_token_ids": [3, 4]}, LONG, "late"))

    async def collect_rest(stream):
        return [out async for out in stream]

    run(main())


def test_start_up_errors_are_llms(qwen3_dir, tmp_path):
    """A bad checkpoint (found before the engine process starts) and a setting the engine process refuses while
    it builds the engine: the same ValueError, with the same message, as LLM raises."""
    for kwargs in [dict(model=str(tmp_path / "missing")), dict(model=qwen3_dir, tp_invariant=4)]:
        with pytest.raises(ValueError) as offline_error:
            LLM(**SETTINGS, **kwargs)
        with pytest.raises(ValueError) as async_error:
            AsyncLLM(**SETTINGS, **kwargs)
        assert str(async_error.value) == str(offline_error.value)
    assert "num_key_value_heads" in str(async_error.value)  # the engine process's own error
    assert not [p for p in multiprocessing.active_children() if p.name == "minivllm-engine-core"]


# ----- bad requests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, params, request_id, error", [
    ("text, but this model has no tokenizer", LONG, "a", ValueError),
    ({"prompt_token_ids": []}, LONG, "a", ValueError),
    ({"prompt_token_ids": [3, 512]}, LONG, "a", ValueError),  # outside the vocabulary
    ({"prompt_token_ids": [3] * 129}, LONG, "a", ValueError),  # longer than max_model_len
    (42, LONG, "a", TypeError),
    ({"prompt_token_ids": [3, 4]}, {"max_tokens": 4}, "a", TypeError),
    ({"prompt_token_ids": [3, 4]}, LONG, 7, TypeError),
])
def test_bad_request_raises_in_the_caller(qwen3_dir, shared_engine, prompt, params, request_id, error):
    engine = shared_engine
    good = SamplingParams(temperature=0.0, max_tokens=5)

    async def main():
        before = engine.stats
        with pytest.raises(error):
            await anext(engine.generate(prompt, params, request_id))
        await asyncio.sleep(0.1)  # time for the engine to run anything that was sent
        assert engine.stats == before and idle_and_free(engine)
        return await collect(engine, {"prompt_token_ids": [3, 4, 5]}, good, "a")

    outs = run(main())
    check_stream(outs, offline(qwen3_dir).generate({"prompt_token_ids": [3, 4, 5]}, good, use_tqdm=False)[0])


def test_duplicate_running_id_raises(qwen3_dir, shared_engine):
    prompt = {"prompt_token_ids": [9, 8, 7, 6]}
    expected = offline(qwen3_dir).generate(prompt, LONG, use_tqdm=False)[0]
    engine = shared_engine

    async def main():
        stream = engine.generate(prompt, LONG, "same")
        outs = [await anext(stream)]
        with pytest.raises(ValueError, match="already running"):
            await anext(engine.generate({"prompt_token_ids": [3, 4]}, LONG, "same"))
        outs += [out async for out in stream]
        return outs, await collect(engine, prompt, LONG, "same")  # free again once it finished

    first, again = run(main())
    check_stream(first, expected)
    check_stream(again, expected)


def test_a_grammar_that_does_not_compile_fails_its_request_alone(tokenizer_model_dir):
    """Compiled in the engine process when the request is added: the error reaches that generator, the engine
    goes on serving."""
    from minivllm import StructuredOutputsParams

    engine = AsyncLLM(tokenizer_model_dir, device="cpu", max_model_len=64)
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="([a-z"))

    async def run() -> list:
        with pytest.raises(ValueError, match="regex"):
            async for _ in engine.generate("x", bad, "bad"):
                pass
        return [o async for o in engine.generate("x", SamplingParams(max_tokens=3, ignore_eos=True), "good")]

    try:
        outputs = asyncio.run(asyncio.wait_for(run(), 60))
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 3 and engine.is_running
        assert not engine._outputs.requests  # the refused request was forgotten too
    finally:
        engine.shutdown()
