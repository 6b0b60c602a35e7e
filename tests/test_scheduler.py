"""Scheduler + BlockManager + LLMEngine bookkeeping under random workloads, with a fake model runner.

The fake runner reads only the step messages, as the real one does. It keeps a fake KV cache
(slot -> (token, position)): it writes every new token into its slot, then reads every key a row attends to
back from the pages. Its "model" is a hash of the token sequence it read there, so the output of every request
is fixed by its prompt alone: any run, whatever the cache size, token budget, prefix caching, preemption,
async scheduling or requests arriving and aborted mid-run, must produce exactly the same tokens, and a page
holding the wrong token changes them. With async scheduling it plays the GPU: a token the host has not
collected yet is read from the previous step's result, as the real runner reads it on the device.
"""

import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivllm.engine.llm_engine import LLMEngine
from minivllm.engine.model_runner import LaunchedStep
from minivllm.engine.step_message import StepMessage
from minivllm.sampling_params import SamplingParams
from tests.test_block_manager import check_block_manager

VOCAB = 50


def next_token(token_ids: list[int]) -> int:
    return hash(tuple(token_ids)) % VOCAB


class FakeRunner:
    """The executor and its runner in one: execute(step) -> LaunchedStep."""

    def __init__(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int):
        self.runner, self.num_kv_blocks = self, num_blocks
        self.block_size, self.budget, self.max_num_seqs = block_size, budget, max_num_seqs
        self.cache: dict[int, tuple[int, int]] = {}
        self.previous_tokens: list[int] = []
        self.steps = 0
        self.prefill_tokens = 0

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, step: StepMessage) -> LaunchedStep:
        self.steps += 1
        assert 1 <= step.num_rows <= self.max_num_seqs
        assert sum(step.num_new_tokens) == step.num_tokens
        if step.is_prefill:
            assert step.num_tokens <= self.budget
            self.prefill_tokens += step.num_tokens
        else:
            assert step.num_new_tokens == [1] * step.num_rows and step.sampling_rows == list(range(step.num_rows))
        tokens = list(step.token_ids)
        offsets = [sum(step.num_new_tokens[:row]) for row in range(step.num_rows)]
        for row, source in step.pending:  # a row's last new token, sampled by the step before
            tokens[offsets[row] + step.num_new_tokens[row] - 1] = self.previous_tokens[source]
        ends = [start + n for start, n in zip(step.start_positions, step.num_new_tokens)]
        for row, table in enumerate(step.block_tables):  # every layer writes the whole batch's K/V first ...
            assert step.num_new_tokens[row] >= 1 and len(table) * self.block_size >= ends[row]
            for i, position in enumerate(range(step.start_positions[row], ends[row])):
                self.cache[self.slot(table, position)] = (tokens[offsets[row] + i], position)
        sampled = []
        for row in step.sampling_rows:  # ... then attention reads every key of the sequence from the pages
            seen = [self.cache.get(self.slot(step.block_tables[row], p)) for p in range(ends[row])]
            assert all(entry is not None and entry[1] == p for p, entry in enumerate(seen)), "a page lost its key"
            sampled.append(next_token([token for token, _ in seen]))
        self.previous_tokens = sampled
        tensor = torch.tensor(sampled, dtype=torch.int64)
        return LaunchedStep(tensor, tensor)

    def shutdown(self) -> None:
        pass


def fake_engine(num_blocks=1000, block_size=4, budget=1000, max_num_seqs=1000, caching=True, max_model_len=1000,
                eos_ids=(), async_scheduling=True) -> LLMEngine:
    args = SimpleNamespace(block_size=block_size, enable_prefix_caching=caching, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=budget, async_scheduling=async_scheduling)
    config = SimpleNamespace(args=args, max_model_len=max_model_len, device=torch.device("cpu"),
                             source=SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB)))
    return LLMEngine(config, FakeRunner(num_blocks, block_size, budget, max_num_seqs), None, list(eos_ids))


def run_engine(prompts: list[list[int]], params: list[SamplingParams], *, check_every_step=True, **settings):
    engine = fake_engine(**settings)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), {"prompt_token_ids": p}, sp)
    finished = {}
    step_limit = 20 * sum(len(p) + sp.max_tokens * sp.n for p, sp in zip(prompts, params)) + 100
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finished, "a request finished twice"
            if out.finished:
                finished[out.request_id] = out
        if check_every_step:
            check_engine(engine)
        assert engine.runner.steps < step_limit, "the engine stopped making progress"
    check_engine(engine)
    assert sorted(finished, key=int) == [str(i) for i in range(len(prompts))], "a request never finished"
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == engine.runner.num_kv_blocks, "blocks leaked after every request finished"
    return [finished[str(i)] for i in range(len(prompts))], engine


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
