"""The staged inputs of the decode graphs equal the inputs the eager decode path builds, with padding rows
that write and read nothing, and tokens still on the GPU taken from the step before."""

import random

import pytest
import torch

from minivllm.engine.graph_inputs import GraphInputs
from minivllm.engine.model_runner import LaunchedStep
from minivllm.engine.sequence import Sequence
from minivllm.sampling_params import SamplingParams
from tests.conftest import LLM


def decoding_sequence(rng: random.Random, block_size: int, pending: bool) -> Sequence:
    seq = Sequence([rng.randrange(512) for _ in range(rng.randint(1, 90))], SamplingParams(max_tokens=200), None)
    seq.num_pending_tokens = int(pending)
    seq.block_table = rng.sample(range(1000), -(-(len(seq) + 1) // block_size))  # room for a pending token
    seq.num_scheduled_tokens = 1
    return seq


@pytest.mark.parametrize("seed", range(6))
def test_graph_inputs_equal_eager_inputs(qwen3_dir, seed):
    rng = random.Random(seed)
    runner = LLM(qwen3_dir, max_model_len=128, block_size=16).engine.runner
    max_blocks = -(-runner.max_model_len // 16)
    previous_seqs = [decoding_sequence(rng, 16, pending=False) for _ in range(rng.randint(1, 6))]
    tokens = torch.tensor([rng.randrange(512) for _ in previous_seqs])
    previous = LaunchedStep(previous_seqs, tokens, tokens)
    inputs = GraphInputs(8, max_blocks, 16, runner.device)
    for _ in range(3):  # both host mirrors, and rows left over from a larger batch
        for seq in previous_seqs:
            seq.num_pending_tokens = rng.random() < 0.7
        seqs = [s for s in previous_seqs if rng.random() < 0.8] + [decoding_sequence(rng, 16, False)]
        rng.shuffle(seqs)
        seqs = seqs[: rng.randint(1, len(seqs))]
        if rng.random() < 0.4:  # the same batch in the same order, all pending: the one-copy path
            seqs = list(previous_seqs)
            for seq in seqs:
                seq.num_pending_tokens = 1
        size = rng.choice([s for s in (1, 2, 4, 8) if s >= len(seqs)])
        inputs.fill(seqs, size, tokens, previous_seqs)
        ids, positions, meta = inputs.views(size)
        want_ids, want_positions, want = runner.prepare_decode(seqs, previous)
        n = len(seqs)
        row_of = {seq.seq_id: row for row, seq in enumerate(previous_seqs)}
        last = [tokens[row_of[s.seq_id]].item() if s.num_pending_tokens else s.token_ids[-1] for s in seqs]
        assert ids[:n].tolist() == want_ids.tolist() == last
        assert positions[:n].tolist() == want_positions.tolist()
        assert meta.slot_mapping.tolist() == want.slot_mapping.tolist() + [-1] * (size - n)
        assert meta.context_lens.tolist() == want.context_lens.tolist() + [0] * (size - n)
        assert meta.total_context_len.tolist() == want.total_context_len.tolist() == [sum(map(len, seqs))]
        for row, seq in enumerate(seqs):
            assert meta.block_tables[row, : len(seq.block_table)].tolist() == seq.block_table
