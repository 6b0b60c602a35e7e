"""Scheduler + BlockManager + LLMEngine bookkeeping under random workloads, with a fake model runner.

The fake runner keeps a fake KV cache (slot -> (token, position)): it writes every scheduled token into
its slot, then checks that every key a sequence attends to is really there. Its "model" is a hash of the
whole token sequence, so the output of every request is fixed by its prompt alone: any run, whatever the
cache size, token budget, prefix caching, preemption or async scheduling, must produce exactly the same
tokens. With async scheduling it plays the GPU: a token the host has not collected yet is read from the
previous step's result, as the real runner reads it from the device.
"""

import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivllm.engine.llm_engine import LLMEngine
from minivllm.engine.model_runner import LaunchedStep
from minivllm.sampling_params import SamplingParams
from tests.test_block_manager import check_block_manager

VOCAB = 50


def next_token(token_ids: list[int]) -> int:
    return hash(tuple(token_ids)) % VOCAB


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int, caching: bool,
                 max_model_len: int, async_scheduling: bool):
        self.config = SimpleNamespace(
            block_size=block_size, enable_prefix_caching=caching, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget, async_scheduling=async_scheduling, tensor_parallel_size=1,
        )
        self.num_kv_blocks = num_blocks
        self.max_model_len = max_model_len
        self.device = "cpu"
        self.cache: dict[int, tuple[int, int]] = {}
        self.steps = 0
        self.prefill_tokens = 0

    def slot(self, seq, position: int) -> int:
        size = self.config.block_size
        return seq.block_table[position // size] * size + position % size

    def launch(self, batch, eos_ids: list[int], previous: LaunchedStep | None) -> LaunchedStep:
        self.steps += 1
        assert batch.seqs and len(batch.seqs) <= self.config.max_num_seqs
        assert len({seq.seq_id for seq in batch.seqs}) == len(batch.seqs)
        if batch.is_prefill:
            assert batch.num_tokens <= self.config.max_num_batched_tokens
            self.prefill_tokens += batch.num_tokens
        on_device = dict(zip(previous.seqs, previous.tokens.tolist())) if previous else {}
        all_tokens = {}
        for seq in batch.seqs:
            assert seq.num_pending_tokens <= 1 and (not seq.num_pending_tokens or not batch.is_prefill)
            all_tokens[seq] = seq.token_ids + ([on_device[seq]] if seq.num_pending_tokens else [])
        for seq in batch.seqs:  # every layer writes the whole batch's K/V first ...
            assert seq.num_scheduled_tokens >= 1
            assert batch.is_prefill or seq.num_scheduled_tokens == 1
            end = seq.num_computed_tokens + seq.num_scheduled_tokens
            assert end <= len(seq) <= seq.max_len and len(seq.block_table) * self.config.block_size >= end
            for position in range(seq.num_computed_tokens, end):
                self.cache[self.slot(seq, position)] = (all_tokens[seq][position], position)
        sampled, tokens = [], []
        for seq in batch.seqs:  # ... then attention reads every key of the sequence from the pages
            end = seq.num_computed_tokens + seq.num_scheduled_tokens
            for position in range(end):
                assert self.cache.get(self.slot(seq, position)) == (all_tokens[seq][position], position), (
                    f"seq {seq.seq_id} position {position}: the page holds another token"
                )
            if seq.samples_this_step:
                sampled.append(seq)
                tokens.append(next_token(all_tokens[seq]))
        tensor = torch.tensor(tokens, dtype=torch.int64)
        return LaunchedStep(sampled, tensor, tensor)


def run_engine(prompts: list[list[int]], params: list[SamplingParams], *, num_blocks=1000, block_size=4,
               budget=1000, max_num_seqs=1000, caching=True, max_model_len=1000, eos_ids=(),
               check_every_step=True, async_scheduling=True):
    runner = FakeRunner(num_blocks, block_size, budget, max_num_seqs, caching, max_model_len, async_scheduling)
    engine = LLMEngine(runner, None, list(eos_ids))
    requests = [engine.add_request(str(i), None, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    finished = []
    step_limit = 20 * sum(len(p) + sp.max_tokens * sp.n for p, sp in zip(prompts, params)) + 100
    while engine.has_unfinished:
        _, _, done = engine.step()
        finished += [r.request_id for r in done]
        if check_every_step:
            check_engine(engine)
        assert runner.steps < step_limit, "the engine stopped making progress"
    check_engine(engine)
    assert sorted(finished, key=int) == [r.request_id for r in requests], "a request finished twice or never"
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == num_blocks, "blocks leaked after every request finished"
    outputs = [engine.output(r) for r in requests]
    return outputs, engine


def check_engine(engine: LLMEngine) -> None:
    scheduler = engine.scheduler
    running, waiting = scheduler.running, list(scheduler.waiting)
    assert not set(map(id, running)) & set(map(id, waiting))
    assert len(running) <= scheduler.max_num_seqs
    for seq in waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in running:
        assert seq.num_computed_tokens <= len(seq)
        assert len(seq.block_table) * scheduler.block_manager.block_size >= seq.num_computed_tokens
    check_block_manager(scheduler.block_manager, running)


def expected_tokens(prompt: list[int], max_tokens: int, max_model_len: int = 1000) -> list[int]:
    tokens = list(prompt)
    while len(tokens) - len(prompt) < max_tokens and len(tokens) < max_model_len:
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


workloads = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**16),
        num_requests=st.integers(1, 12),
        prefix_len=st.integers(0, 24),
        max_prompt=st.integers(1, 30),
        max_tokens=st.integers(1, 20),
        block_size=st.sampled_from([1, 2, 4, 8]),
        spare_blocks=st.integers(0, 12),
        budget=st.integers(1, 64),
        max_num_seqs=st.integers(1, 8),
        caching=st.booleans(),
        async_scheduling=st.booleans(),
    )
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_random_workloads_finish_with_unconstrained_outputs(w):
    rng = random.Random(w["seed"])
    prefix = [rng.randrange(VOCAB) for _ in range(w["prefix_len"])]
    prompts = []
    for _ in range(w["num_requests"]):
        shared = prefix[: rng.randint(0, len(prefix))]
        prompts.append(shared + [rng.randrange(VOCAB) for _ in range(rng.randint(1, w["max_prompt"]))])
    params = [SamplingParams(max_tokens=rng.randint(1, w["max_tokens"]), n=rng.choice([1, 1, 2])) for _ in prompts]
    longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
    # the cache always holds the longest request alone, with a few blocks to spare
    num_blocks = -(-longest // w["block_size"]) + w["spare_blocks"]
    outputs, engine = run_engine(
        prompts, params, num_blocks=num_blocks, block_size=w["block_size"], budget=w["budget"],
        max_num_seqs=w["max_num_seqs"], caching=w["caching"], async_scheduling=w["async_scheduling"],
    )
    for prompt, sp, out in zip(prompts, params, outputs):
        assert out.finished and len(out.outputs) == sp.n
        for completion in out.outputs:
            assert completion.token_ids == expected_tokens(prompt, sp.max_tokens)
            assert completion.finish_reason == "length"


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([2, 4]), st.booleans())
def test_stop_ids_and_max_model_len_under_pressure(seed, block_size, async_scheduling):
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(8)]
    eos = rng.randrange(VOCAB)
    params = [SamplingParams(max_tokens=30, stop_token_ids=[rng.randrange(VOCAB)]) for _ in prompts]
    max_model_len = 32
    outputs, _ = run_engine(prompts, params, num_blocks=max_model_len // block_size + 2, block_size=block_size,
                            budget=12, max_model_len=max_model_len, eos_ids=[eos], async_scheduling=async_scheduling)
    for prompt, sp, out in zip(prompts, params, outputs):
        unbounded = expected_tokens(prompt, sp.max_tokens, max_model_len)
        completion = out.outputs[0]
        stops = [i for i, t in enumerate(unbounded) if t in sp.stop_token_ids or t == eos]
        if stops:
            assert completion.token_ids == unbounded[: stops[0] + 1]
            assert completion.finish_reason == "stop"
            token = unbounded[stops[0]]
            assert completion.stop_reason == (token if token in sp.stop_token_ids else None)
        else:
            assert completion.token_ids == unbounded and completion.finish_reason == "length"
            assert len(prompt) + len(unbounded) <= max_model_len


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tiny_cache_preempts_and_still_finishes(async_scheduling):
    prompts = [[i % VOCAB] * 10 + [j for j in range(i, i + 5)] for i in range(10)]
    params = [SamplingParams(max_tokens=20)] * 10
    outputs, engine = run_engine(prompts, params, num_blocks=9, block_size=4, budget=16,
                                 async_scheduling=async_scheduling)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == expected_tokens(prompt, 20)


def test_chunked_prompts_do_not_stall_or_preempt_with_room():
    """With ample blocks nothing is preempted, and a prefill step fills its budget while prompt tokens wait."""
    prompts = [[(7 * i + j) % VOCAB for j in range(40)] for i in range(4)]
    runner_budget = 16
    outputs, engine = run_engine(prompts, [SamplingParams(max_tokens=5)] * 4, budget=runner_budget, caching=False)
    assert engine.scheduler.num_preemptions == 0
    assert engine.runner.steps <= sum(map(len, prompts)) // runner_budget + 5 * 4


@pytest.mark.parametrize("caching", [False, True])
def test_shared_prefix_in_one_step_is_shared_and_correct(caching):
    prefix = list(range(30))
    prompts = [prefix + [40 + i] for i in range(5)]
    outputs, engine = run_engine(prompts, [SamplingParams(max_tokens=3)] * 5, block_size=4, caching=caching)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == expected_tokens(prompt, 3)
    # all five prompts are prefilled in the first step; with caching the last four reuse the first's 7 blocks
    assert engine.runner.prefill_tokens == (5 * 31 if not caching else 31 + 4 * 3)
