"""AsyncLLM on the CPU: concurrent streams equal the offline outputs, deltas add up, leaving a stream aborts its
request and frees its blocks, an engine failure reaches every stream, bad requests raise in the caller, and the
engine thread sleeps while idle. Every wait is bounded, so a bug fails a test instead of hanging it."""

import asyncio
import contextlib
import functools
import time
from dataclasses import replace

import pytest

import minivllm
from minivllm import AsyncLLM, RequestOutputKind, SamplingParams
from minivllm.async_llm import EngineDeadError
from minivllm.engine.llm_engine import EngineStats
from tests.conftest import LLM, random_prompts, token_prompts

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
    llm_engine = engine.llm_engine
    free = llm_engine.scheduler.block_manager.num_free_blocks == llm_engine.runner.num_kv_blocks
    return free and not llm_engine.has_unfinished_requests()


def check_stream(outs: list, expected) -> None:
    """A cumulative stream: one output per token, each extending the last, finished only at the end, ending
    where the offline run ended."""
    tokens = [out.outputs[0].token_ids for out in outs]
    assert [len(t) for t in tokens] == list(range(1, len(outs) + 1))
    assert all(tokens[-1][: len(t)] == t for t in tokens)
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
        assert engine.llm_engine.has_unfinished_requests()
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
        assert [len(out.outputs[0].token_ids) for out in parts] == [1] * len(parts)
        assert [tok for out in parts for tok in out.outputs[0].token_ids] == final.token_ids
        assert "".join(out.outputs[0].text for out in parts) == final.text
        assert parts[-1].finished and parts[-1].outputs[0].finish_reason == final.finish_reason
    assert all(full[-1].outputs[0].text for full in cumulative)


# ----- leaving early -----------------------------------------------------------------------------------------
def test_leaving_a_stream_aborts_it_and_frees_its_blocks(qwen3_dir, make_engine):
    """break, aclose(), a cancelled task and abort() each stop their request mid-run, while the other requests
    (one reusing the id left by aclose() at once) finish as offline; at the end every block is free."""
    prompts = random_prompts(10, 5, 20, seed=5)
    expected = offline(qwen3_dir).generate(token_prompts(prompts), LONG, use_tqdm=False)
    engine = make_engine(qwen3_dir)
    aborted_at = {}  # engine id -> output tokens when its abort reached the engine (None: it had finished)
    abort_request = engine.llm_engine.abort_request

    def recording_abort(request_id):
        request = engine.llm_engine.requests.get(request_id)
        aborted_at[request_id] = request.seqs[0].num_output_tokens if request else None
        abort_request(request_id)

    engine.llm_engine.abort_request = recording_abort

    async def broken_off(prompt, request_id: str) -> int:
        seen = 0
        async for _ in engine.generate(prompt, LONG, request_id):
            seen += 1
            if seen == 3:
                break
        return seen

    async def cancelled(prompt) -> None:
        two = asyncio.Event()

        async def consume():
            async for out in engine.generate(prompt, LONG, "cancel"):
                if len(out.outputs[0].token_ids) == 2:
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
        stream = engine.generate({"prompt_token_ids": prompts[1]}, LONG, "aclose")
        await anext(stream)
        await stream.aclose()
        reused = asyncio.create_task(collect(engine, {"prompt_token_ids": prompts[4]}, LONG, "aclose"))
        await cancelled({"prompt_token_ids": prompts[2]})
        explicit = []
        async for out in engine.generate({"prompt_token_ids": prompts[3]}, LONG, "explicit"):
            explicit.append(out)
            if len(explicit) == 2:
                await engine.abort(["explicit", "unknown"])
        return explicit, await reused, await asyncio.gather(*others)

    explicit, reused, others = run(main())
    assert explicit[-1].finished and explicit[-1].outputs[0].finish_reason == "abort"
    assert not any(out.finished for out in explicit[:-1])
    check_stream(reused, expected[4])
    for outs, want in zip(others, expected[5:]):
        check_stream(outs, want)
    stopped = {engine_id.split("#")[0]: tokens for engine_id, tokens in aborted_at.items()}
    assert set(stopped) == {"break", "aclose", "cancel", "explicit"}
    assert all(tokens is not None and tokens < LONG.max_tokens for tokens in stopped.values()), stopped
    run(wait_until(lambda: idle_and_free(engine)))


def test_idle_engine_sleeps_and_wakes_at_once(qwen3_dir, make_engine):
    engine = make_engine(qwen3_dir)
    calls = {"step": 0, "has_unfinished_requests": 0}  # each engine-loop turn calls both (one while idle)

    def counted(name: str):
        method = getattr(engine.llm_engine, name)

        def call():
            calls[name] += 1
            return method()

        return call

    for name in calls:
        setattr(engine.llm_engine, name, counted(name))

    async def main():
        await asyncio.sleep(0.3)
        idle = dict(calls)
        start = time.perf_counter()
        outs = await collect(engine, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=1), "wake")
        latency = time.perf_counter() - start
        await asyncio.sleep(0.05)  # the thread's last loop turn after the request finished
        done = dict(calls)
        await asyncio.sleep(0.3)
        return idle, latency, outs, done

    idle, latency, outs, done = run(main())
    assert idle["step"] == 0 and idle["has_unfinished_requests"] <= 1  # asleep on its queue since it started
    assert latency < 2.0 and outs[-1].finished
    assert calls == done  # and asleep again once the request finished


def test_server_readings(qwen3_dir, make_engine):
    engine = make_engine(qwen3_dir)

    async def main():
        readings = []
        async for out in engine.generate({"prompt_token_ids": list(range(2, 40))}, LONG, "read"):
            if len(out.outputs[0].token_ids) == 2:
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
def test_engine_failure_reaches_every_generator(qwen3_dir, make_engine):
    """Four requests run and four wait (max_num_seqs=4) when a step raises: all eight raise that error."""
    engine = make_engine(qwen3_dir, max_num_seqs=4)
    boom = RuntimeError("injected step failure")

    def failing_execute(step):
        raise boom

    async def main():
        streams = [asyncio.create_task(collect(engine, {"prompt_token_ids": p}, LONG, f"f{i}"))
                   for i, p in enumerate(random_prompts(8, 5, 20, seed=8))]
        await wait_until(lambda: engine.stats.generation_tokens >= 4)
        engine.llm_engine.executor.execute = failing_execute
        errors = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 5)
        with pytest.raises(EngineDeadError, match="injected step failure"):
            await anext(engine.generate({"prompt_token_ids": [3, 4]}, LONG, "late"))
        return errors

    assert run(main()) == [boom] * 8
    assert not engine.is_running
    engine.shutdown()
    engine.shutdown()  # idempotent


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
def test_bad_request_raises_in_the_caller(qwen3_dir, make_engine, prompt, params, request_id, error):
    engine = make_engine(qwen3_dir)
    good = SamplingParams(temperature=0.0, max_tokens=5)

    async def main():
        with pytest.raises(error):
            await anext(engine.generate(prompt, params, request_id))
        await asyncio.sleep(0.05)  # time for the engine thread to take anything that was queued
        assert engine.stats == EngineStats() and not engine.llm_engine.has_unfinished_requests()
        return await collect(engine, {"prompt_token_ids": [3, 4, 5]}, good, "a")

    outs = run(main())
    check_stream(outs, offline(qwen3_dir).generate({"prompt_token_ids": [3, 4, 5]}, good, use_tqdm=False)[0])


def test_duplicate_running_id_raises(qwen3_dir, make_engine):
    prompt = {"prompt_token_ids": [9, 8, 7, 6]}
    expected = offline(qwen3_dir).generate(prompt, LONG, use_tqdm=False)[0]
    engine = make_engine(qwen3_dir)

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
    """Compiled on the engine thread when the request is added: the error reaches that generator, the engine
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
    finally:
        engine.shutdown()
