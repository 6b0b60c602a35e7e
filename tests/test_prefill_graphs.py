"""The prefill's piecewise graphs (engine/prefill_graphs.py) on the CPU, each piece run eagerly where its graph would
replay: a step padded to its bucket (the buffers between the pieces, attention's out, the padding tokens) gives the
eager forward's hidden states and writes the same cache slots, and no others. The captured graphs themselves are
tested on the GPU (tests/gpu/test_engine_gpu.py), through the same helper."""

import pytest
import torch

from minivllm.engine.prefill_graphs import PrefillGraphs
from minivllm.engine.step_message import StepMessage
from minivllm.layers.attention import AttentionMetadata
from tests.conftest import LLM

BLOCK = 16


def prefill(rows: list[tuple[list[int], int, list[int]]]) -> StepMessage:
    """A prefill step of (new token ids, start position, block table) rows that samples nothing."""
    tokens = [t for ids, _, _ in rows for t in ids]
    return StepMessage(True, tokens, [len(ids) for ids, _, _ in rows], [start for _, start, _ in rows],
                       [table for _, _, table in rows], [], [])


def written_slots(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """The cache slots whose K or V changed, of caches [2, layers, blocks, block_size, heads, D]."""
    changed = (before != after).flatten(4).any(-1).any(0).any(0)  # [blocks, block_size]
    return changed.flatten().nonzero().flatten().tolist()


def step_slots(step: StepMessage) -> list[int]:
    return sorted(table[p // BLOCK] * BLOCK + p % BLOCK for n, start, table in
                  zip(step.num_new_tokens, step.start_positions, step.block_tables) for p in range(start, start + n))


def bucketed_against_eager(runner, run_bucket, step: StepMessage, bucket: int):
    """(hidden states, cache) of the step staged for bucket and run by run_bucket(bucket, meta), then of the same
    step staged and run eagerly from the same cache, and the cache before both."""
    before = runner.kv_cache.clone()
    staged = runner.inputs.stage(step, step.num_rows, None, None, graph_tokens=bucket)
    with torch.inference_mode():
        ours = run_bucket(bucket, staged.meta)[: step.num_tokens].clone()
    ours_cache = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    staged = runner.inputs.stage(step, step.num_rows, None, None)
    with torch.inference_mode():
        eager = runner.model(staged.input_ids, staged.positions, staged.meta)
    return (ours, ours_cache), (eager, runner.kv_cache.clone()), before


def chunked_steps(seed: int = 0) -> tuple[StepMessage, StepMessage]:
    """A first 16-token chunk of prompt A, then A's next 24 tokens (its first 16 in the cache: the paged path)
    with all 20 tokens of prompt B: 44 tokens."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(2, 512, (40,), generator=g).tolist(), torch.randint(2, 512, (20,), generator=g).tolist()
    return prefill([(a[:16], 0, [0, 1, 2])]), prefill([(a[16:], 16, [0, 1, 2]), (b, 0, [3, 4])])


def check_a_chunk_after_a_cached_one(runner, run_bucket, tolerance: float) -> None:
    """chunked_steps' first chunk eagerly, then its second (44 tokens, bucket 64) through run_bucket against the
    eager prefill: hidden states and caches within tolerance, and only the step's own cache slots written."""
    first, second = chunked_steps()
    staged = runner.inputs.stage(first, 1, None, None)
    with torch.inference_mode():
        runner.model(staged.input_ids, staged.positions, staged.meta)
    (ours, ours_cache), (eager, eager_cache), before = bucketed_against_eager(runner, run_bucket, second, 64)
    torch.testing.assert_close(ours, eager, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours_cache, eager_cache, rtol=tolerance, atol=tolerance)
    assert written_slots(before, ours_cache) == step_slots(second)


class EagerPiece:
    """Stands in for a captured piece: replay() runs the piece eagerly, on the buffers its graph would read."""

    def __init__(self, graphs: PrefillGraphs, index: int, bucket: int, views: tuple, state: dict):
        self.graphs, self.index, self.bucket, self.views, self.state = graphs, index, bucket, views, state

    def replay(self) -> None:
        residual = self.state.get("residual") if self.index else None
        out, self.state["residual"] = self.graphs.piece(self.index, *self.views, self.bucket, residual)
        self.graphs.hidden[self.bucket] = out


@pytest.fixture
def runner(qwen3_dir):
    llm = LLM(qwen3_dir, max_model_len=128, num_kv_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    return llm.llm_engine.runner


def test_buckets_hold_steps_above_the_small_m_rows_up_to_the_budget(runner):
    graphs = PrefillGraphs(runner.model, 1000)
    assert graphs.buckets == [32, 64, 128, 256, 512]
    assert [graphs.bucket(n) for n in (1, 16, 17, 32, 33, 512, 513)] == [None, None, 32, 32, 64, 512, None]


def test_a_step_staged_for_a_bucket_is_padded_where_its_graph_reads(runner):
    input_ids, positions, slots = runner.inputs.prefill_views(64)
    _, step = chunked_steps()
    staged = runner.inputs.stage(step, step.num_rows, None, None, graph_tokens=64)
    assert [t.data_ptr() for t in (staged.input_ids, staged.positions, staged.meta.slot_mapping)] == [
        t.data_ptr() for t in (input_ids, positions, slots)]
    assert staged.input_ids.tolist() == step.token_ids + [0] * 20
    assert staged.positions.tolist() == list(range(16, 40)) + list(range(20)) + [0] * 20
    assert sorted(staged.meta.slot_mapping[:44].tolist()) == step_slots(step)
    assert staged.meta.slot_mapping[44:].tolist() == [-1] * 20
    assert staged.meta.cu_seqlens_q.tolist() == [0, 24, 44] and staged.meta.cu_seqlens_k.tolist() == [0, 40, 60]


def test_a_padded_step_through_the_pieces_is_the_eager_prefill(runner):
    graphs = PrefillGraphs(runner.model, 64)
    input_ids, positions, slots = runner.inputs.prefill_views(64)
    state: dict = {}
    views = (input_ids, positions, AttentionMetadata(True, slots))
    graphs.graphs[64] = [EagerPiece(graphs, i, 64, views, state) for i in range(len(runner.model.model.layers) + 1)]
    check_a_chunk_after_a_cached_one(runner, graphs.run, 1e-5)  # fp32
