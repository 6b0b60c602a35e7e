"""The online engine (llm.llm_engine): requests added and aborted while others run, on the tiny checkpoint.

Whatever arrives or leaves mid-run, with a KV cache small enough to preempt, every request that is not aborted
gets exactly its solo greedy tokens, an aborted one is reported once (finish_reason "abort", its tokens a
prefix of its solo run) and never again, and no block is left behind.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivllm import RequestOutputKind, SamplingParams
from tests.conftest import LLM, random_prompts
from tests.test_block_manager import check_block_manager

POOL = random_prompts(10, 1, 60, seed=90)
MAX_TOKENS = (3, 9, 20)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def solo(qwen3_dir) -> dict[int, list[int]]:
    """Each pool prompt's greedy tokens, run alone on an unconstrained engine (the longest max_tokens)."""
    plain = LLM(qwen3_dir, max_model_len=96, enable_prefix_caching=False)
    return {i: plain.generate({"prompt_token_ids": p}, greedy(max(MAX_TOKENS)), use_tqdm=False)[0]
            .outputs[0].token_ids for i, p in enumerate(POOL)}


@pytest.fixture(scope="module")
def small(qwen3_dir):
    """7 blocks of 16: a few requests at once fill it, so the engine preempts."""
    return LLM(qwen3_dir, max_model_len=96, num_kv_blocks=7, max_num_seqs=4, max_num_batched_tokens=32)


events = st.lists(
    st.tuples(st.integers(0, 6), st.sampled_from(["add", "abort"]), st.integers(0, len(POOL) - 1),
              st.sampled_from(MAX_TOKENS)),
    min_size=1, max_size=14,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events)
def test_arrivals_and_aborts_mid_run_keep_every_other_request_exact(small, solo, plan):
    engine = small.llm_engine
    added: dict[str, tuple[int, int]] = {}  # request id -> (pool prompt, max_tokens)
    aborted: set[str] = set()
    finished: dict[str, object] = {}
    step = 0
    while plan or engine.has_unfinished_requests():
        while plan and plan[0][0] <= step:
            _, what, index, max_tokens = plan.pop(0)
            if what == "add":
                request_id = f"r{len(added)}"
                engine.add_request(request_id, {"prompt_token_ids": POOL[index]}, greedy(max_tokens))
                added[request_id] = (index, max_tokens)
            elif added:  # abort one of those added: running, finished or already aborted alike
                request_id = sorted(added)[index % len(added)]
                if request_id not in finished:
                    aborted.add(request_id)
                engine.abort_request(request_id)
        for out in engine.step():
            assert out.request_id not in finished, f"{out.request_id} reported after it finished"
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < 2000, "the engine stopped making progress"
    assert set(finished) == set(added)
    for request_id, (index, max_tokens) in added.items():
        completion = finished[request_id].outputs[0]
        if request_id in aborted:
            assert completion.finish_reason == "abort"
            assert completion.token_ids == solo[index][: len(completion.token_ids)]
        else:
            assert completion.finish_reason == "length"
            assert completion.token_ids == solo[index][:max_tokens]
    block_manager = engine.scheduler.block_manager
    check_block_manager(block_manager, [])
    assert block_manager.num_free_blocks == engine.runner.num_kv_blocks, "an aborted request kept its blocks"
    # a request needing all but one block still runs (6 of 7 blocks: 80 prompt + 16 new tokens)
    [out] = small.generate({"prompt_token_ids": random_prompts(1, 80, 80, seed=91)[0]}, greedy(16), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 16


def test_abort_frees_blocks_at_once_and_reports_once(qwen3_dir):
    llm = LLM(qwen3_dir, max_model_len=96)
    engine = llm.llm_engine
    free = engine.scheduler.block_manager.num_free_blocks
    engine.add_request("a", {"prompt_token_ids": POOL[0] * 2}, greedy(20))
    engine.add_request("b", {"prompt_token_ids": POOL[1]}, greedy(5))
    for _ in range(3):
        engine.step()
    engine.abort_request(["a", "unknown id"])  # an unknown id is a no-op
    assert engine.get_num_unfinished_requests() == 1
    held_by_b = -(-(len(POOL[1]) + 5) // 16)
    assert free - engine.scheduler.block_manager.num_free_blocks <= held_by_b, "a's blocks were not freed at once"
    outputs = [out for _ in range(30) for out in engine.step()]
    a_outputs = [out for out in outputs if out.request_id == "a"]
    assert len(a_outputs) == 1 and a_outputs[0].finished and a_outputs[0].outputs[0].finish_reason == "abort"
    assert [out.finished for out in outputs if out.request_id == "b"][-1]
    engine.abort_request("a")  # already reported: nothing more
    assert not engine.step() and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("c", {"prompt_token_ids": [3]}, greedy(5))
        engine.add_request("c", {"prompt_token_ids": [3]}, greedy(5))
    engine.abort_request("c")


def test_cumulative_and_delta_outputs_stream_every_token(tok_llm):
    engine = tok_llm.llm_engine
    prompt = "The quick brown fox"
    engine.add_request("cum", prompt, greedy(12))
    engine.add_request("delta", prompt, greedy(12, output_kind=RequestOutputKind.DELTA))
    engine.add_request("final", prompt, greedy(12, output_kind=RequestOutputKind.FINAL_ONLY))
    seen: dict[str, list] = {"cum": [], "delta": [], "final": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    [final] = seen["final"]
    assert final.finished and len(final.outputs[0].token_ids) == 12
    cumulative = seen["cum"]
    assert len(cumulative) == 12 and [o.finished for o in cumulative] == [False] * 11 + [True]
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 13))
    assert cumulative[-1].outputs[0].token_ids == final.outputs[0].token_ids
    assert cumulative[-1].outputs[0].text == final.outputs[0].text
    assert all(b.outputs[0].text.startswith(a.outputs[0].text) for a, b in zip(cumulative, cumulative[1:]))
    deltas = seen["delta"]
    assert len(deltas) == 12
    assert sum((o.outputs[0].token_ids for o in deltas), []) == final.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in deltas) == final.outputs[0].text


def test_streamed_text_never_takes_back_a_stop_string(tok_llm):
    """Text already streamed cannot be cut later: what might begin a stop string is held back until it is known."""
    engine = tok_llm.llm_engine
    [reference] = tok_llm.generate("Once upon a time", greedy(16), use_tqdm=False)
    text, ids = reference.outputs[0].text, reference.outputs[0].token_ids
    # a stop string across two tokens' text, so that its first half is decoded one step before the second
    boundaries = [len(tok_llm.get_tokenizer().decode(ids[:k])) for k in range(4, 12)]
    stop = next(text[b - 2 : b + 2] for b in boundaries if 2 <= b <= len(text) - 2 and text.find(text[b - 2 : b + 2])
                == b - 2)
    engine.add_request("s", "Once upon a time", greedy(16, stop=[stop]))
    streamed = []
    while engine.has_unfinished_requests():
        streamed += [out.outputs[0].text for out in engine.step()]
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))
    assert streamed[-1] == text[: text.find(stop)]
