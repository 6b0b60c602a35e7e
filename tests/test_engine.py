"""Engine features end to end on a tiny random checkpoint: prefix caching, chunked prefill, preemption,
n > 1, seeds, sampling knobs, every stop condition, output shapes, chat and tokenizer-less checkpoints."""

import contextlib
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minivllm
from minivllm import SamplingParams
from tests.conftest import LLM, completions, random_prompts, token_prompts, with_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def record_batches(llm: minivllm.LLM) -> list[dict]:
    """Wrap the runner so every step message is recorded: kind, tokens and each row's block table."""
    runner, log = llm.llm_engine.runner, []
    execute = runner.execute

    def recording_execute(step):
        log.append(dict(is_prefill=step.is_prefill, num_tokens=step.num_tokens,
                        tables=[list(table) for table in step.block_tables]))
        return execute(step)

    runner.execute = recording_execute
    return log


def prefill_tokens(log: list[dict]) -> int:
    return sum(step["num_tokens"] for step in log if step["is_prefill"])


def greedy_reference(llm: minivllm.LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return completions(llm.generate(token_prompts(prompts), params, use_tqdm=False))


# ----- prefix caching, chunked prefill, preemption ---------------------------------------------------------
def shared_prefix_prompts(count: int, prefix_len: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, prefix_len, seed)[0]
    return [prefix + suffix for suffix in random_prompts(count, 1, 20, seed + 1)]


def test_prefix_caching_gives_same_tokens_and_hits(qwen3_dir):
    prompts = shared_prefix_prompts(6, 50, seed=10)
    plain = LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=False)
    plain_log = record_batches(plain)
    expected = greedy_reference(plain, prompts[:1]) + greedy_reference(plain, prompts[1:])
    assert prefill_tokens(plain_log) == sum(map(len, prompts))

    cached = LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=True)
    cached_log = record_batches(cached)
    got = greedy_reference(cached, prompts[:1]) + greedy_reference(cached, prompts[1:])
    assert got == expected
    # the 50-token prefix is 3 full blocks of 16: the last 5 prompts reuse them
    assert prefill_tokens(cached_log) == sum(map(len, prompts)) - 5 * 48
    # a repeated prompt hits every full block but still computes its last token
    again = greedy_reference(cached, prompts[:1])
    assert again == expected[:1]


def test_prefix_caching_shares_blocks_within_one_batch(qwen3_dir):
    """Prompts with a common prefix submitted together reuse the blocks the first one fills in the same step."""
    prompts = shared_prefix_prompts(4, 40, seed=11)
    plain = LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=False)
    expected = greedy_reference(plain, prompts)
    cached = LLM(qwen3_dir, max_model_len=128)
    log = record_batches(cached)
    assert greedy_reference(cached, prompts) == expected
    assert prefill_tokens(log) == sum(map(len, prompts)) - 3 * 32


def test_prefix_caching_survives_eviction(qwen3_dir):
    """A tiny cache keeps evicting cached blocks; the tokens must not change."""
    prompts = shared_prefix_prompts(8, 40, seed=12) + random_prompts(8, 20, 60, seed=13)
    expected = greedy_reference(LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=False), prompts)
    tiny = LLM(qwen3_dir, max_model_len=96, num_kv_blocks=12, max_num_seqs=4)
    got = greedy_reference(tiny, prompts[::2]) + greedy_reference(tiny, prompts[1::2])
    assert got == expected[::2] + expected[1::2]


def test_chunked_prefill_equals_plain_run(qwen3_dir):
    prompts = random_prompts(5, 50, 90, seed=20)
    expected = greedy_reference(LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=False), prompts)
    for caching in (False, True):
        chunked = LLM(qwen3_dir, max_model_len=128, max_num_batched_tokens=16, enable_prefix_caching=caching)
        log = record_batches(chunked)
        assert greedy_reference(chunked, prompts) == expected
        assert all(step["num_tokens"] <= 16 for step in log)
        assert sum(step["is_prefill"] for step in log) >= sum(len(p) for p in prompts) // 16


def test_preemption_under_tiny_cache_equals_unconstrained_run(qwen3_dir):
    prompts = random_prompts(10, 10, 40, seed=30)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = greedy_reference(LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=False), prompts, params)
    for caching in (False, True):
        tiny = LLM(qwen3_dir, max_model_len=96, num_kv_blocks=8, enable_prefix_caching=caching)
        outputs = tiny.generate(token_prompts(prompts), params, use_tqdm=False)
        assert tiny.llm_engine.scheduler.num_preemptions > 0
        assert len(outputs) == len(prompts) and all(o.finished for o in outputs)
        assert [o.prompt_token_ids for o in outputs] == prompts
        assert completions(outputs) == expected
        assert all(c.finish_reason == "length" and len(c.token_ids) == 40 for o in outputs for c in o.outputs)
        assert tiny.llm_engine.scheduler.block_manager.num_free_blocks == 8  # everything given back


def test_max_model_len_is_capped_by_kv_capacity(qwen3_dir):
    with pytest.warns(UserWarning, match="capacity"):
        small = LLM(qwen3_dir, max_model_len=128, num_kv_blocks=4)
    assert small.max_model_len == 64
    out = small.generate({"prompt_token_ids": list(range(2, 62))}, SamplingParams(max_tokens=50, ignore_eos=True),
                         use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"


def test_async_scheduling_changes_no_output(qwen3_dir):
    """Launching step N+1 before step N's tokens reach the host changes nothing a request sees: greedy tokens,
    stops on a token (whose extra step is dropped), seeded samples, and prefix-cache hits on blocks that
    generated tokens completed (published when those tokens arrived)."""
    prompts = random_prompts(8, 5, 60, seed=80)
    sync, overlapped = (LLM(qwen3_dir, max_model_len=128, async_scheduling=a) for a in (False, True))
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tokens = greedy_reference(sync, prompts, greedy)
    assert greedy_reference(overlapped, prompts, greedy) == tokens
    stops = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[t[5 + i]]) for i, t in enumerate(tokens)]
    seeded = [SamplingParams(temperature=1.0, max_tokens=20, seed=i) for i in range(len(prompts))]
    for params in (stops, seeded):
        expected = sync.generate(token_prompts(prompts), params, use_tqdm=False)
        got = overlapped.generate(token_prompts(prompts), params, use_tqdm=False)
        assert [(c.token_ids, c.finish_reason, c.stop_reason) for o in got for c in o.outputs] == [
            (c.token_ids, c.finish_reason, c.stop_reason) for o in expected for c in o.outputs
        ]
    # a second turn: prompt and answer come back with a suffix; the blocks the answer filled are hits
    turns = [p + t + [7, 8] for p, t in zip(prompts, tokens)]
    log = record_batches(overlapped)
    assert greedy_reference(overlapped, turns, greedy) == greedy_reference(sync, turns, greedy)
    block = overlapped.config.args.block_size
    assert prefill_tokens(log) <= sum(len(t) - (len(p) + len(a) - 1) // block * block
                                      for t, p, a in zip(turns, prompts, tokens))


@pytest.fixture(scope="module")
def plain_reference(qwen3_dir):
    """Greedy tokens of a pool of prompts (some sharing prefixes) from a plain, unconstrained engine."""
    prompts = shared_prefix_prompts(6, 35, seed=14) + random_prompts(6, 1, 70, seed=15)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = LLM(qwen3_dir, max_model_len=128, enable_prefix_caching=False)
    return prompts, dict(zip(map(tuple, prompts), greedy_reference(plain, prompts, params)))


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.integers(0, 11), min_size=1, max_size=8),
    st.sampled_from([16, 32, 64]),
    st.integers(8, 96),
    st.integers(0, 6),
    st.booleans(),
    st.integers(1, 8),
    st.booleans(),
)
def test_random_engine_settings_keep_greedy_tokens(
    qwen3_dir, plain_reference, picks, block_size, budget, spare_blocks, caching, max_num_seqs, async_scheduling
):
    """Whatever the page size, token budget, cache size, caching, batch width and scheduling: the plain run's
    tokens."""
    prompts, expected = plain_reference
    chosen = [prompts[i] for i in picks]
    num_blocks = -(-80 // block_size) + spare_blocks  # the longest request (70 + 10 tokens) always fits
    with pytest.warns() if num_blocks * block_size < 128 else contextlib.nullcontext():
        llm = LLM(qwen3_dir, max_model_len=128, block_size=block_size, max_num_batched_tokens=budget,
                  num_kv_blocks=num_blocks, enable_prefix_caching=caching, max_num_seqs=max_num_seqs,
                  async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    assert greedy_reference(llm, chosen, params) == [expected[tuple(p)] for p in chosen]
    assert llm.llm_engine.scheduler.block_manager.num_free_blocks == num_blocks


# ----- n > 1 and seeds -------------------------------------------------------------------------------------
def test_n_completions_share_prompt_blocks_and_differ(qwen3_dir):
    llm = LLM(qwen3_dir, max_model_len=128)
    log = record_batches(llm)
    prompt = random_prompts(1, 40, 40, seed=40)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    [out] = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3, "seeded completions should differ"
    first_decode = next(step for step in log if not step["is_prefill"])
    tables = first_decode["tables"]
    assert len(tables) == 3
    full_blocks = (len(prompt) - 1) // 16
    assert all(t[:full_blocks] == tables[0][:full_blocks] for t in tables), tables
    assert prefill_tokens(log) == len(prompt) + 2 * (len(prompt) - full_blocks * 16)


def test_seeded_sampling_reproduces_regardless_of_batch(llm):
    prompt = {"prompt_token_ids": random_prompts(1, 20, 20, seed=41)[0]}
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    others = token_prompts(random_prompts(5, 5, 50, seed=42))
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(others[:2] + [prompt] + others[2:], [unseeded] * 2 + [seeded] + [unseeded] * 3,
                         use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.8, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate(prompt, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_seeded_sampling_reproduces_under_preemption(qwen3_dir):
    prompts = random_prompts(8, 10, 30, seed=43)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True) for i in range(8)]
    expected = completions(LLM(qwen3_dir, max_model_len=96).generate(token_prompts(prompts), params, use_tqdm=False))
    tiny = LLM(qwen3_dir, max_model_len=96, num_kv_blocks=6, max_num_batched_tokens=16)
    assert completions(tiny.generate(token_prompts(prompts), params, use_tqdm=False)) == expected
    assert tiny.llm_engine.scheduler.num_preemptions > 0


def test_sampler_warm_up_leaves_the_engines_draws_alone(qwen3_dir):
    """On a GPU the sampler is compiled at start-up (warm_up_sampler); its draws must not advance the engine's
    generator, or LLM(seed=) would sample differently than without the warm-up."""
    prompts = token_prompts(random_prompts(3, 5, 30, seed=52))
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    plain, warmed = (LLM(qwen3_dir, max_model_len=96, seed=7) for _ in range(2))
    warmed.llm_engine.runner.warm_up_sampler()
    assert completions(warmed.generate(prompts, params, use_tqdm=False)) == completions(
        plain.generate(prompts, params, use_tqdm=False))


def test_sampler_warm_up_compiles_at_the_largest_batch(qwen3_dir, monkeypatch):
    """The warm-up's second graph is the one every batch of two rows or more reuses, and Triton tunes it on its
    first call: that call must be at the most rows a step samples, where the throughput is decided."""
    import minivllm.engine.model_runner as model_runner

    llm = LLM(qwen3_dir, max_model_len=96, max_num_seqs=24, max_num_batched_tokens=64)
    rows = []
    monkeypatch.setattr(model_runner, "sample", lambda logits, batch: rows.append(logits.shape[0]))
    llm.llm_engine.runner.warm_up_sampler()
    assert sorted(set(rows)) == [1, 24]
    assert rows.index(1) < rows.index(24)  # one row first: its graph is specialised, the second is the dynamic one


@pytest.mark.parametrize(
    "knobs",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-4)],
    ids=["top_k=1", "tiny_top_p", "min_p=1", "tiny_temperature"],
)
def test_degenerate_sampling_equals_greedy(llm, knobs):
    prompts = random_prompts(4, 5, 40, seed=50)
    expected = greedy_reference(llm, prompts)
    params = SamplingParams(**{"temperature": 1.0, "max_tokens": 12, "ignore_eos": True, **knobs})
    assert greedy_reference(llm, prompts, params) == expected


def test_temperature_sampling_differs_from_greedy(llm):
    prompts = random_prompts(4, 5, 40, seed=51)
    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, seed=3)
    assert greedy_reference(llm, prompts, params) != greedy_reference(llm, prompts)


# ----- stop conditions -------------------------------------------------------------------------------------
def first_repeatable_token(tokens: list[int], at_least: int) -> tuple[int, int]:
    """A token of the completion and the index of its first occurrence, at or after `at_least`."""
    for i in range(at_least, len(tokens)):
        if tokens.index(tokens[i]) == i:
            return tokens[i], i
    raise AssertionError(f"no fresh token after {at_least} in {tokens}")


def varied_greedy(llm: minivllm.LLM, seed: int, fresh_after=(4,), max_tokens: int = 20, vocab: int = 512):
    """(prompt, greedy tokens) whose completion has a first-time token at or after each index in fresh_after.

    A random model can fall into a loop of one or two tokens; such prompts are skipped.
    """
    candidates = token_prompts(random_prompts(8, 8, 16, seed, vocab))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for prompt, out in zip(candidates, llm.generate(candidates, params, use_tqdm=False)):
        tokens = out.outputs[0].token_ids
        if all(any(tokens.index(t) == i for i, t in enumerate(tokens) if i >= k) for k in fresh_after):
            return prompt, tokens
    raise AssertionError("every candidate prompt fell into a short loop")


def test_stop_token_ids(llm):
    prompt, tokens = varied_greedy(llm, seed=60)
    stop, index = first_repeatable_token(tokens, 4)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.token_ids == tokens[: index + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    # min_tokens past the stop id's position bans it until then
    params = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop], min_tokens=index + 2)
    late = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert stop not in late.token_ids[: index + 2]
    assert len(late.token_ids) >= index + 2


def test_eos_ignore_eos_and_min_tokens(qwen3_dir, llm, tmp_path):
    prompt, tokens = varied_greedy(llm, seed=61, fresh_after=(3,))
    eos, index = first_repeatable_token(tokens, 3)
    eos_llm = LLM(with_config(qwen3_dir, tmp_path / "eos", eos_token_id=eos), max_model_len=128)
    stopped = eos_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == tokens[: index + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", None)
    ignored = eos_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert ignored[0].outputs[0].token_ids == tokens
    assert ignored[0].outputs[0].finish_reason == "length"
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=index + 3)
    late = eos_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert late.token_ids[:index] == tokens[:index] and late.token_ids[index] != eos
    assert eos not in late.token_ids[: index + 3]


def test_max_tokens_and_max_model_len_give_length(qwen3_dir):
    llm = LLM(qwen3_dir, max_model_len=40)
    prompts = token_prompts(random_prompts(2, 30, 30, seed=62))
    outs = llm.generate(prompts, [SamplingParams(max_tokens=5, ignore_eos=True),
                                  SamplingParams(max_tokens=100, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 10]
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    assert all(o.outputs[0].stop_reason is None for o in outs)


def test_outputs_in_input_order_with_fields(llm):
    prompts = random_prompts(6, 1, 60, seed=63)
    max_tokens = [12, 1, 7, 3, 9, 2]  # they finish in a different order than they were given
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens
    assert len({o.request_id for o in outs}) == 6
    for out in outs:
        assert out.finished and out.prompt is None and out.outputs[0].index == 0
        assert out.outputs[0].text == ""  # no tokenizer
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.finished_time
    # each equals its own run alone
    assert completions(outs)[0] == greedy_reference(llm, prompts[:1], params[0])[0]


def test_prompt_forms(llm):
    ids = random_prompts(2, 5, 9, seed=64)
    expected = greedy_reference(llm, ids)
    assert completions(llm.generate(ids, GREEDY, use_tqdm=False)) == expected  # a list of lists of ints
    assert completions(llm.generate(token_prompts(ids)[0], GREEDY, use_tqdm=False)) == expected[:1]
    out = llm.generate({"prompt_token_ids": ids[0], "prompt": "hi"}, GREEDY, use_tqdm=False)[0]
    assert out.prompt == "hi"


def test_no_tokenizer_gives_empty_text(llm):
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", GREEDY, use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 12


# ----- with the real Qwen3 tokenizer -------------------------------------------------------------------------
def test_string_prompts_are_tokenized(tok_llm):
    tokenizer = tok_llm.get_tokenizer()
    out = tok_llm.generate(["Hello there", "The capital of France"], GREEDY, use_tqdm=False)
    assert [o.prompt for o in out] == ["Hello there", "The capital of France"]
    assert [o.prompt_token_ids for o in out] == [tokenizer.encode(o.prompt) for o in out]
    for o in out:
        c = o.outputs[0]
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_stop_strings_cut_text(tok_llm):
    tokenizer = tok_llm.get_tokenizer()
    prompt = "Once upon a time"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert len(full.text) > 12, full.text
    for start, length in ((len(full.text) // 2, 3), (len(full.text) - 2, 2)):
        stop = full.text[start : start + length]
        cut = full.text.find(stop)
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["\x00never", stop])
        out = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == full.text[:cut]
        assert out.token_ids == full.token_ids[: len(out.token_ids)]
        # the completion ends with the token that completed the stop string
        assert stop in tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert stop not in tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)


def test_stop_token_text_is_left_out(tok_llm):
    """The eos or stop id that ends a completion stays in token_ids but not in the text (as vLLM)."""
    tokenizer = tok_llm.get_tokenizer()
    prompt, tokens = varied_greedy(tok_llm, seed=94, max_tokens=16, vocab=151643)
    stop, index = first_repeatable_token(tokens, 4)
    for skip in (True, False):
        params = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop], skip_special_tokens=skip)
        out = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == tokens[: index + 1] and out.stop_reason == stop
        assert out.text == tokenizer.decode(tokens[:index], skip_special_tokens=skip)


@pytest.mark.parametrize("min_tokens", [4, 8, 12])
def test_stop_strings_only_match_after_min_tokens(tok_llm, min_tokens):
    """Text of the first min_tokens tokens is never matched, even by the short one of two stop strings."""
    tokenizer = tok_llm.get_tokenizer()
    prompt = "It was a dark and stormy night"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    region = len(tokenizer.decode(full.token_ids[:min_tokens]))
    stop = full.text[region - 3 : region - 1]  # ends inside the first min_tokens tokens' text
    never = "\x00" * 40
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, never], min_tokens=min_tokens)
    out = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    cut = full.text.find(stop, region - len(stop) + 1)
    if cut < 0:
        assert (out.finish_reason, out.text, out.token_ids) == ("length", full.text, full.token_ids)
    else:
        assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, full.text[:cut])


def test_stop_strings_wait_for_min_tokens(tok_llm):
    prompt = "Once upon a time"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    stop = full.text[:2]  # appears within the first tokens
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop, min_tokens=20)
    out = tok_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 20


def test_chat_applies_template(tok_llm):
    tokenizer = tok_llm.get_tokenizer()
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    outs = tok_llm.chat([conversation, conversation + [{"role": "assistant", "content": "4"}]], GREEDY,
                        use_tqdm=False)
    assert len(outs) == 2
    assert outs[0].prompt == text
    assert outs[0].prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert outs[0].outputs[0].token_ids == completions(
        tok_llm.generate({"prompt_token_ids": outs[0].prompt_token_ids}, GREEDY, use_tqdm=False))[0]
    single = tok_llm.chat(conversation, GREEDY, use_tqdm=False)
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


# ----- engine-level settings -----------------------------------------------------------------------------
def test_engine_seed_makes_unseeded_sampling_reproducible(qwen3_dir):
    prompts = token_prompts(random_prompts(3, 5, 20, seed=90))
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    first = completions(LLM(qwen3_dir, max_model_len=64, seed=3).generate(prompts, params, use_tqdm=False))
    second = completions(LLM(qwen3_dir, max_model_len=64, seed=3).generate(prompts, params, use_tqdm=False))
    assert first == second


def test_progress_bar_and_summary(llm, capsys, caplog):
    prompts = random_prompts(3, 5, 20, seed=91)
    with caplog.at_level(logging.INFO, logger="minivllm"):
        outs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=True)
    assert completions(outs) == greedy_reference(llm, prompts)
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar is on stderr, the summary in the log: nothing breaks a piped stdout
    assert "Processed prompts" in captured.err
    # the one-line summary names the requests and the prompt and output token counts (wording may change)
    summary = [r.getMessage() for r in caplog.records if r.name.startswith("minivllm") and "requests" in r.getMessage()]
    assert len(summary) == 1
    assert "3 requests" in summary[0] and f"{sum(map(len, prompts))} prompt" in summary[0]
    assert "36 output" in summary[0]


def test_max_model_len_capped_at_model_positions(qwen3_dir):
    with pytest.warns(UserWarning, match="256 positions"):
        llm = LLM(qwen3_dir, max_model_len=1000)
    assert llm.max_model_len == 256
    default = LLM(qwen3_dir, max_num_seqs=4)
    assert default.max_model_len == 256


def test_generation_config_eos_ids_all_stop(qwen3_dir, llm, tmp_path):
    prompt, tokens = varied_greedy(llm, seed=92, fresh_after=(3, 8))
    late, late_index = first_repeatable_token(tokens, 8)
    early, early_index = first_repeatable_token(tokens, 3)
    path = with_config(qwen3_dir, tmp_path / "gen", eos_token_id=late)
    with open(f"{path}/generation_config.json", "w") as f:
        f.write(f'{{"eos_token_id": [{late}, {early}]}}')
    out = LLM(path, max_model_len=64).generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert out[0].outputs[0].token_ids == tokens[: early_index + 1]
    assert (out[0].outputs[0].finish_reason, out[0].outputs[0].stop_reason) == ("stop", None)


def test_n_greedy_completions_and_n_with_stops(llm):
    prompt = {"prompt_token_ids": random_prompts(1, 30, 30, seed=93)[0]}
    [out] = llm.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) == 1
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=30, ignore_eos=True)
    [sampled] = llm.generate(prompt, params, use_tqdm=False)
    stop = sampled.outputs[0].token_ids[2]
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    [stopped] = llm.generate(prompt, params, use_tqdm=False)
    assert stopped.finished
    for full, cut in zip(sampled.outputs, stopped.outputs):
        end = full.token_ids.index(stop) + 1 if stop in full.token_ids else len(full.token_ids)
        assert cut.token_ids == full.token_ids[:end]
        assert cut.finish_reason == ("stop" if stop in full.token_ids else "length")


def test_vllm_text_prompt_dict_and_prompt_tuple(tok_llm):
    expected = completions(tok_llm.generate(["Hello", "World"], GREEDY, use_tqdm=False))
    assert completions(tok_llm.generate({"prompt": "Hello"}, GREEDY, use_tqdm=False)) == expected[:1]
    assert completions(tok_llm.generate(("Hello", "World"), GREEDY, use_tqdm=False)) == expected


def test_cpu_kv_cache_is_sized_from_available_memory(qwen3_dir, monkeypatch):
    """A share of the memory available, at least one max_model_len sequence, at most what max_num_seqs need;
    num_kv_blocks overrides it."""
    from minivllm.engine import model_runner

    per_block = 2 * 2 * 2 * 64 * 4 * 16  # K and V, 2 layers, 2 KV heads, head_dim 64, fp32, 16 tokens
    for available, blocks in [(1 << 40, 4 * 128 // 16), (64 * per_block, 16), (1, 128 // 16)]:
        monkeypatch.setattr(model_runner, "available_memory_bytes", lambda available=available: available)
        assert LLM(qwen3_dir, max_model_len=128, max_num_seqs=4).llm_engine.runner.num_kv_blocks == blocks
    assert LLM(qwen3_dir, max_model_len=128, num_kv_blocks=11).llm_engine.runner.num_kv_blocks == 11
