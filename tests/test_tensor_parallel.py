"""Tensor parallelism on the CPU: two processes joined by gloo, against the single-process engine.

Sharding itself is checked in one process (every rank's parts put together are the whole model). Each
tensor-parallel LLM spawns a worker process (several seconds: it imports torch), so each test makes one
and shuts it down before the next (a process holds one tensor-parallel group at a time).
"""

import functools
import multiprocessing
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config import EngineArgs
from minivllm.distributed import TensorParallel
from minivllm.engine import tp_workers
from minivllm.engine.model_runner import build_model
from minivllm.engine.tp_workers import TensorParallelError
from minivllm.model_loader import resolve_model
from minivllm.models.decoder import kv_head_split
from minivllm.presets import PRESETS
from tests.conftest import completions, random_prompts, recorded_logits, token_prompts, write_checkpoint
from tests.tp_faults import failing_worker

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=8, ignore_eos=True)

# name -> (family, config overrides): KV heads split over the ranks, and one KV head replicated on both;
# untied and tied embeddings; a vocabulary that does not divide by the ranks; biases on every projection
# (a row-parallel bias must be added once, not once a rank).
CASES = {
    "qwen3-kv2-split-untied": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "llama-kv1-replicated-tied-bias-vocab509": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
             attention_bias=True, mlp_bias=True, vocab_size=509),
    ),
}


def workers_alive() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("minivllm-tp-rank")]


@pytest.fixture
def no_stray_workers():
    yield
    assert not workers_alive(), "a tensor-parallel worker outlived its LLM"


@pytest.fixture(scope="module")
def qwen3_kv2(tmp_path_factory) -> str:
    family, overrides = CASES["qwen3-kv2-split-untied"]
    return write_checkpoint(tmp_path_factory.mktemp("tp_qwen3"), family, seed=3, **overrides)[0]


# ----- sharding, in one process: every rank's parts put together are the single-process model -------------
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("weights", ["checkpoint", "random preset"])
def test_shards_assemble_the_single_process_model(weights, size, tmp_path, monkeypatch):
    """Column and row splits, KV heads split (2 ranks) and replicated (4 ranks, 2 KV heads), a padded vocabulary
    (509 rows), biases; loaded from safetensors slices, or drawn whole by the random initialiser and cut."""
    if weights == "checkpoint":
        name, _ = write_checkpoint(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   vocab_size=509, attention_bias=True, mlp_bias=True)
    else:
        name = "qwen3-test-tp"
        monkeypatch.setitem(PRESETS, name, (64, 128, 1, 8, False))
    source = resolve_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preset's random-weights warning
        build = functools.partial(build_model, source, torch.float32, torch.device("cpu"), 0)
        whole = dict(build().named_parameters())
        ranks = [dict(build(TensorParallel(rank, size)).named_parameters()) for rank in range(size)]
    for name, full in whole.items():
        sharding = getattr(ranks[0][name], "sharding", None)
        if sharding is None or sharding.splits[0].parts == 1:  # replicated (norms; row-parallel biases)
            assert all(torch.equal(parts[name], full) for parts in ranks), name
            continue
        pieces = []
        for piece, full_size in enumerate(sharding.full_sizes):
            by_index = {}  # replicated KV heads: several ranks hold the same part
            for parts in ranks:
                split = parts[name].sharding.splits[piece]
                by_index[split.index] = parts[name].sharding.target(parts[name], piece)
            pieces.append(torch.cat([by_index[i] for i in sorted(by_index)], dim=sharding.dim))
            assert pieces[-1].shape[sharding.dim] == full_size, name
        assert torch.equal(torch.cat(pieces, dim=sharding.dim), full), name


@pytest.mark.parametrize("heads, kv_heads, size", [(8, 2, 2), (8, 2, 4), (8, 1, 4), (16, 8, 8), (4, 4, 2)])
def test_each_rank_holds_the_kv_heads_its_query_heads_use(heads, kv_heads, size):
    group = heads // kv_heads
    for rank in range(size):
        split = kv_head_split(kv_heads, TensorParallel(rank, size))
        held = range(split.index * kv_heads // split.parts, (split.index + 1) * kv_heads // split.parts)
        query_heads = range(rank * heads // size, (rank + 1) * heads // size)
        assert {q // group for q in query_heads} == set(held), (rank, split)


def generate_all(llm: LLM, batches: list[tuple[list, list]]) -> list[list[int]]:
    return [tokens for prompts, params in batches for tokens in completions(llm.generate(prompts, params, False))]


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_equal_single_process(case, tmp_path, no_stray_workers):
    """Greedy and seeded sampling, chunked prefill (a small token budget, so prefill also reads keys from the
    paged cache) and prefix-cache hits (a second batch sharing a prompt's first blocks)."""
    family, overrides = CASES[case]
    path, _ = write_checkpoint(tmp_path, family, seed=sum(map(ord, case)), **overrides)
    prompts = random_prompts(6, 1, 70, seed=3, vocab=overrides.get("vocab_size", 512))
    batches = [
        (token_prompts(prompts), [GREEDY] * 4 + [SEEDED] * 2),
        (token_prompts([max(prompts, key=len)[:40] + tail for tail in random_prompts(3, 1, 9, seed=4)]), GREEDY),
    ]
    engine = dict(max_model_len=128, max_num_batched_tokens=48, max_num_seqs=8)
    expected = generate_all(LLM(path, **engine), batches)
    split = LLM(path, tensor_parallel_size=2, **engine)
    try:
        with pytest.raises(RuntimeError, match="shutdown"):  # one tensor-parallel group a process
            LLM(path, tensor_parallel_size=2, **engine)
        assert generate_all(split, batches) == expected
    finally:
        split.shutdown()
    assert not workers_alive()
    with pytest.raises(TensorParallelError, match="shut down"):
        split.generate(batches[1][0], GREEDY, use_tqdm=False)


def run_arrivals(llm: LLM) -> dict[str, tuple[list[int], str]]:
    """Requests arriving at steps 0, 2 and 5 and one aborted at step 4, stepped on llm's online engine: each
    request's tokens and finish reason."""
    engine, prompts = llm.llm_engine, random_prompts(6, 1, 60, seed=12)
    finished: dict[str, tuple[list[int], str]] = {}
    for step in range(500):
        if step in (0, 2, 5):
            for i in (step, step + 1):
                engine.add_request(f"r{i}", {"prompt_token_ids": prompts[i % 6]}, [GREEDY, SEEDED][i % 2])
        if step == 4:
            engine.abort_request("r1")
        finished.update((o.request_id, (o.outputs[0].token_ids, o.outputs[0].finish_reason))
                        for o in engine.step() if o.finished)
        if step > 5 and not engine.has_unfinished_requests():
            return finished
    raise AssertionError("the engine stopped making progress")


def test_arrivals_mid_run_equal_single_process(qwen3_kv2, no_stray_workers):
    """The online engine at tensor_parallel_size 2: requests joining a running batch (with async scheduling) and
    an abort give what one process gives."""
    engine = dict(max_model_len=128, max_num_batched_tokens=48, max_num_seqs=8)
    expected = run_arrivals(LLM(qwen3_kv2, **engine))
    assert expected["r1"][1] == "abort" and sorted(expected) == [f"r{i}" for i in (0, 1, 2, 3, 5, 6)]
    split = LLM(qwen3_kv2, tensor_parallel_size=2, **engine)
    try:
        assert run_arrivals(split) == expected
    finally:
        split.shutdown()


def test_interpreter_exit_stops_the_workers(qwen3_kv2):
    """An LLM never shut down: its workers stop when the interpreter exits."""
    script = (
        "from minivllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({qwen3_kv2!r}, max_model_len=64, tensor_parallel_size=2)\n"
        "    print(*[p.pid for p in llm.llm_engine.executor.processes])\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
    for pid in map(int, result.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class RecordedProcess:
    """A worker process that is alive until joined, and says when it was joined."""

    def __init__(self, events: list[str]):
        self.events, self.alive = events, True

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout=None) -> None:
        self.events.append("join")
        self.alive = False


class RecordedGraph:
    def __init__(self, events: list[str]):
        self.events = events

    def reset(self) -> None:
        self.events.append("graph reset")


@pytest.mark.parametrize("workers_alive_at_stop", [True, False])
def test_rank_zero_leaves_the_group_in_an_order_nccl_can_finish(monkeypatch, workers_alive_at_stop):
    """NCCL's shutdown is collective and waits for every graph that captured a collective: rank 0 must destroy
    its graphs, tell the workers to stop, and leave the group together with them before it waits for them to
    exit. Left alone (a worker died), it aborts instead."""
    events: list[str] = []
    monkeypatch.setattr(tp_workers.dist, "broadcast_object_list", lambda obj, **kw: events.append(f"send {obj}"))
    monkeypatch.setattr(tp_workers, "leave_tensor_parallel", lambda alone=False: events.append(f"leave {alone}"))
    processes = [RecordedProcess(events), RecordedProcess(events)]
    processes[1].alive = workers_alive_at_stop
    graphs = [RecordedGraph(events), RecordedGraph(events)]
    tp_workers.stop_workers(processes, object(), graphs)
    if workers_alive_at_stop:
        assert events == ["graph reset", "graph reset", "send [None]", "leave False", "join", "join", "leave True"]
    else:
        assert events == ["graph reset", "graph reset", "join", "join", "leave True"]
    assert graphs == []


# ----- a failing rank ----------------------------------------------------------------------------------------
def test_rank_failing_to_load_stops_the_group(qwen3_kv2, monkeypatch, no_stray_workers):
    monkeypatch.setattr(tp_workers, "run_worker", functools.partial(failing_worker, "load"))
    with pytest.raises(TensorParallelError, match=r"(?s)rank 1 failed: OSError: injected: shard .* is corrupt"):
        LLM(qwen3_kv2, max_model_len=128, tensor_parallel_size=2)


def test_rank_failing_in_a_step_stops_the_group(qwen3_kv2, monkeypatch, no_stray_workers):
    monkeypatch.setattr(tp_workers, "run_worker", functools.partial(failing_worker, "step"))
    llm = LLM(qwen3_kv2, max_model_len=128, tensor_parallel_size=2)
    start = time.perf_counter()
    with pytest.raises(TensorParallelError, match="rank 1 failed: RuntimeError: injected: step failed"):
        llm.generate(token_prompts(random_prompts(2, 5, 20, seed=4)), GREEDY, use_tqdm=False)
    assert time.perf_counter() - start < 30, "rank 0 should notice the failed rank within seconds, not time out"
    with pytest.raises(TensorParallelError, match="rank 1 failed"):  # the group stays stopped
        llm.generate(token_prompts(random_prompts(1, 5, 20, seed=5)), GREEDY, use_tqdm=False)


def logits_and_tokens(path: str, **engine) -> tuple[torch.Tensor, list[list[int]]]:
    """Every step's logits, and the greedy tokens."""
    llm = LLM(path, dtype="bfloat16", max_model_len=128, max_num_batched_tokens=48, max_num_seqs=8, **engine)
    try:
        prompts = token_prompts(random_prompts(6, 1, 70, seed=3))
        with recorded_logits() as seen:
            outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), False)
    finally:
        llm.shutdown()
    return torch.cat(seen), completions(outputs)


@pytest.mark.parametrize("tp_invariant", [2, 4])  # one K slice a rank, or two summed on the rank first
def test_tp_invariant_gives_the_same_bits(tp_invariant, tmp_path, no_stray_workers):
    """In bf16, where each rank rounding its own part changes the last bits (and with tp_invariant=0 the logits
    here differ): every step's logits at tensor_parallel_size 2 are TP=1's, bit for bit, with chunked prefill."""
    path, _ = write_checkpoint(tmp_path, "qwen3", seed=5, num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    single_logits, single_tokens = logits_and_tokens(path, tp_invariant=tp_invariant)
    split_logits, split_tokens = logits_and_tokens(path, tp_invariant=tp_invariant, tensor_parallel_size=2)
    assert split_logits.shape == single_logits.shape and split_logits.shape[0] >= 16
    assert torch.equal(split_logits, single_logits)
    assert split_tokens == single_tokens


# ----- bad sizes, refused before any process starts ------------------------------------------------------
@pytest.mark.parametrize(
    "size, error, message",
    [(0, ValueError, "tensor_parallel_size must be at least 1"), ("2", TypeError, "tensor_parallel_size"),
     (True, TypeError, "tensor_parallel_size"), (3, ValueError, "num_attention_heads 4 is not a multiple of")],
)
def test_bad_tensor_parallel_size(qwen3_kv2, size, error, message, no_stray_workers):
    with pytest.raises(error, match=message):
        LLM(qwen3_kv2, tensor_parallel_size=size)


@pytest.mark.parametrize(
    "tp_invariant, size, error, message",
    [(-2, 1, ValueError, "tp_invariant must be 0"), (3, 1, ValueError, "power of two"),
     (2, 4, ValueError, "that tensor_parallel_size 4 divides"), (2.0, 1, TypeError, "tp_invariant must be an int"),
     (4, 1, ValueError, "tp_invariant=4 does not fit this model: num_key_value_heads 2 is not a multiple")],
)
def test_bad_tp_invariant(qwen3_kv2, tp_invariant, size, error, message, no_stray_workers):
    with pytest.raises(error, match=message):
        LLM(qwen3_kv2, tensor_parallel_size=size, tp_invariant=tp_invariant)


def test_kv_heads_that_neither_divide_nor_are_divided(tmp_path):
    path, _ = write_checkpoint(tmp_path, "qwen3", num_attention_heads=12, num_key_value_heads=3, head_dim=16)
    with pytest.raises(ValueError, match="num_key_value_heads 3 neither divides"):
        LLM(path, tensor_parallel_size=2)


def test_more_ranks_than_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert EngineArgs(model="m", device="cuda", tensor_parallel_size=2).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="only 2 CUDA GPU"):
        EngineArgs(model="m", device="cuda", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="only 2 CUDA GPU"):
        EngineArgs(model="m", device="cuda:1", tensor_parallel_size=2)
