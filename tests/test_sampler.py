"""The batched sampler against the distributions it should draw from (large batches of one row, so the
frequencies are close to the probabilities), and its per-request seeds and bans."""

import pytest
import torch

from minivllm.engine.penalty_slots import PenaltySlots
from minivllm.engine.sequence import Sequence
from minivllm.engine.step_inputs import StepInputs
from minivllm.engine.step_message import sampling_rows
from minivllm.layers.penalties import PenaltyCounts
from minivllm.layers.sampler import COLUMNS, SamplingBatch, sample, top_k
from minivllm.sampling_params import SamplingParams

ROWS = 20000
PROBS = torch.tensor([0.05, 0.5, 0.0, 0.15, 0.3])  # a shuffled order, so nothing relies on sorted input


STAGING = StepInputs(8, 8, 1, 16, torch.device("cpu"))


def batch_of(params: list[SamplingParams], eos_ids=(), seeds=None, outputs=0, vocab_size=1000) -> SamplingBatch:
    seqs = []
    for i, p in enumerate(params):
        generator = None if seeds is None or seeds[i] is None else torch.Generator().manual_seed(seeds[i])
        seq = Sequence([1, 2, 3], p, generator, 1000)
        for _ in range(outputs):
            seq.append_token(4)
        seqs.append(seq)
    # the engine's rows, staged as the runner stages them
    rows = sampling_rows(seqs, list(eos_ids), vocab_size, PenaltySlots(len(seqs)))
    columns = {name: torch.tensor(values, dtype=COLUMNS[name][0]) for name, values in rows.used_columns().items()}
    return STAGING.sampling_batch(rows, columns, None, PenaltyCounts(vocab_size, len(seqs), torch.device("cpu")))


def draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    return sample(logits, batch).tokens


def frequencies(params: SamplingParams, logits: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    tokens = draw(logits.expand(rows, -1).clone(), batch_of([params] * rows))
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / rows


def test_temperature_one_draws_from_softmax():
    torch.manual_seed(0)
    freq = frequencies(SamplingParams(temperature=1.0), PROBS.log())
    assert (freq - PROBS).abs().max() < 0.015
    assert freq[2] == 0


def test_temperature_sharpens_and_flattens():
    torch.manual_seed(1)
    logits = PROBS.clamp(min=1e-9).log()
    for temperature in (0.5, 2.0):
        expected = (logits / temperature).softmax(-1)
        freq = frequencies(SamplingParams(temperature=temperature), logits)
        assert (freq - expected).abs().max() < 0.015, temperature


@pytest.mark.parametrize("top_k", [0, 3])
def test_penalties_shape_a_temperature_draw(top_k):
    """Every row at temperature 1 with penalties: a plain draw applies them inside its own pass (csrc/sampler.cu
    on the GPU), one with top-k before it; both draw from the softmax of the penalized logits. The rows' output
    is token 4 once and their prompt tokens 1..3: presence and frequency lower token 4, repetition divides the
    positive logits of 1, 3 and 4."""
    torch.manual_seed(7)
    logits = PROBS.clamp(min=1e-9).log() + 1.0  # 0.05 -> -2.0, 0.5 -> 0.31 ...: both signs for repetition
    params = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                            top_k=top_k)
    seen = torch.tensor([False, True, True, True, True])
    penalized = torch.where(seen, torch.where(logits > 0, logits / 1.5, logits * 1.5), logits)
    penalized[4] -= 0.75
    expected = penalized.softmax(-1)
    if top_k:
        expected[expected.argsort()[: 5 - top_k]] = 0
        expected /= expected.sum()
    tokens = draw(logits.expand(ROWS, -1).clone(), batch_of([params] * ROWS, outputs=1, vocab_size=5))
    freq = torch.bincount(tokens, minlength=5).float() / ROWS
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


@pytest.mark.parametrize(
    "knobs, allowed",
    [
        (dict(top_k=2), [1, 4]),
        (dict(top_k=3), [1, 4, 3]),
        (dict(top_p=0.7), [1, 4]),  # smallest set reaching 0.7: 0.5 + 0.3
        (dict(top_p=0.85), [1, 4, 3]),
        (dict(min_p=0.5), [1, 4]),  # p >= 0.5 * 0.5
        (dict(min_p=0.2), [1, 4, 3]),
        (dict(top_k=3, top_p=0.7), [1, 4]),
        (dict(min_p=0.5, top_p=0.6), [1]),  # as vLLM, min_p first: top-p then sees [0.625, 0.375]
    ],
)
def test_truncation_keeps_the_right_tokens_renormalised(knobs, allowed):
    torch.manual_seed(2)
    freq = frequencies(SamplingParams(temperature=1.0, **knobs), PROBS.clamp(min=1e-9).log())
    expected = torch.zeros_like(PROBS)
    expected[allowed] = PROBS[allowed] / PROBS[allowed].sum()
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_mixed_batch_rows_follow_their_own_params():
    torch.manual_seed(3)
    logits = torch.randn(6, 100)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.0, top_k=50),
    ]
    for _ in range(20):
        tokens = draw(logits.clone(), batch_of(params))
        greedy = logits.argmax(-1)
        assert tokens[[0, 1, 2, 3, 5]].tolist() == greedy[[0, 1, 2, 3, 5]].tolist()
        assert tokens[4].item() in logits[4].topk(3).indices.tolist()


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.randn(4, 50)
    top = logits.argmax(-1)
    eos = top[0].item()
    params = [
        SamplingParams(temperature=0.0, min_tokens=3),  # eos banned
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[top[1].item()]),  # stop id banned
        SamplingParams(temperature=0.0, min_tokens=1),  # reached: nothing banned
        SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True),
    ]
    logits[3, eos] = 100.0
    tokens = draw(logits.clone(), batch_of(params, eos_ids=[eos], outputs=2))
    assert tokens[0] != eos and tokens[0] == logits[0].topk(2).indices[1]
    assert tokens[1] != top[1]
    assert tokens[2] == top[2]
    assert tokens[3] == eos  # ignore_eos: eos is an ordinary token


def test_seeded_row_does_not_depend_on_the_batch():
    torch.manual_seed(4)
    logits = torch.randn(8, 64)
    seeded = SamplingParams(temperature=1.0, seed=11)

    def draws(row: int, size: int, steps: int = 10) -> list[int]:
        params = [SamplingParams(temperature=1.0)] * size
        params[row] = seeded
        seeds = [None] * size
        seeds[row] = 11
        batch = batch_of(params, seeds=seeds)
        out = []
        for _ in range(steps):
            rows = logits[:size].clone()
            rows[row] = logits[0]
            out.append(draw(rows, batch)[row].item())
        return out

    alone = draws(0, 1)
    assert draws(5, 8) == alone
    assert draws(2, 3) == alone
    assert len(set(alone)) > 1


def test_engine_generator_drives_unseeded_rows():
    logits = torch.randn(4, 64)
    params = [SamplingParams(temperature=1.0)] * 4

    def draws(seed: int) -> list[list[int]]:
        batch = batch_of(params)
        batch.generator = torch.Generator().manual_seed(seed)
        return [draw(logits.clone(), batch).tolist() for _ in range(5)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_bans_ignore_ids_outside_the_vocabulary():
    """stop_token_ids beyond the logits (or negative) can never be sampled: min_tokens must not index with them."""
    logits = torch.randn(2, 50)
    params = [
        SamplingParams(temperature=0.0, min_tokens=5, stop_token_ids=[10**6, -1]),
        SamplingParams(temperature=1.0, seed=1, min_tokens=5, stop_token_ids=[50]),
    ]
    tokens = draw(logits.clone(), batch_of(params, eos_ids=[77], seeds=[None, 1], vocab_size=50))
    assert tokens[0] == logits[0].argmax()  # -1 must not ban the last token
    assert 0 <= tokens[1] < 50


def test_engine_min_tokens_with_out_of_vocab_stop_ids(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, stop_token_ids=[10**6], ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


@pytest.mark.parametrize("vocab", [151936, 1024, 997])
def test_top_k_equals_torch_topk(vocab):
    """Through the chunks of highest maxima (vocab divisible by 128; 997, prime, falls back to torch.topk), with
    ties inside and across chunks: the same values, and ids that point at them."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    logits[0, :300] = 4.0  # ties across chunk boundaries, above everything else
    logits[1, ::7] = 5.0
    logits[2] = 0.0  # one value everywhere
    for k in (0, 1, 5, 20):
        values, ids = top_k(logits, k)
        assert torch.equal(values, logits.topk(k, dim=-1).values), k
        assert torch.equal(logits.gather(1, ids), values) and all(len(set(r)) == len(r) for r in ids.tolist()), k
