"""The sampler kernels (csrc/sampler.cu) against their torch references in minivllm/ops/reference.py, run eagerly
on the same GPU tensors: random shapes (1..300 rows; vocabularies of 151,936, 1000, 997 (prime, so no 16-byte
rows), 8 and 1), with and without penalties, temperatures from 1e-6 to 2, -inf logits, ties placed within a
16-byte vector, across threads and across the row's splits; rows unaligned for the vector path; capture in a CUDA
graph and replay with new data; and the refusals of bad input. The argmax must give torch's token exactly (the
kernel rounds as torch's eager ops do), the counts must be exact and the log-sum-exp within 1e-5 relative."""

import random

import pytest
import torch

from minivllm import ops
from minivllm.ops import KERNELS_BUILT, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)

VOCABS = [151936, 1000, 997, 8, 1]


def argmax_kernel(logits, noise, temperatures, penalties=()):
    return torch.ops.minivllm.sampler_gumbel_argmax(logits, noise, temperatures, *penalties)


def lse_kernel(logits, tokens):
    return torch.ops.minivllm.sampler_logsumexp_rank(logits, tokens)


def poison_next_allocation(shape, dtype, value):
    """Leave a block of this size filled with value free in torch's caching allocator: the next allocation of
    this size (the kernel's output) gets it, so an element the kernel does not write keeps the value."""
    torch.full(shape, value, dtype=dtype, device="cuda")


def random_logits(rows, vocab, g, neg_inf=True):
    logits = torch.randn(rows, vocab, device="cuda", generator=g) * 3
    if neg_inf:  # banned tokens, and one row with nothing but -inf when there are a few rows
        banned = torch.rand(rows, vocab, device="cuda", generator=g) < 0.05
        logits = logits.masked_fill(banned, float("-inf"))
        if rows > 2:
            logits[rows // 2] = float("-inf")
    return logits


def random_temperatures(rows, g):
    t = torch.rand(rows, device="cuda", generator=g) * 2
    special = torch.tensor([1e-6, 2.0, 0.0, 1.0], device="cuda")
    t[: min(rows, 4)] = special[: min(rows, 4)]
    return t[torch.randperm(rows, device="cuda", generator=g)]


def random_penalties(rows, vocab, g):
    """(output_counts, in_prompt, slots, presence, frequency, repetition) as PenaltyCounts and Penalties hold them:
    a few slots, sparse counts, some rows neutral (0, 0, 1)."""
    num_slots = random.randint(1, 6)
    counts = torch.randint(0, 4, (num_slots, vocab), device="cuda", generator=g, dtype=torch.int32)
    counts *= torch.rand(num_slots, vocab, device="cuda", generator=g) < 0.2
    in_prompt = torch.rand(num_slots, vocab, device="cuda", generator=g) < 0.1
    slots = torch.randint(0, num_slots, (rows,), device="cuda", generator=g)
    presence = torch.rand(rows, device="cuda", generator=g) * 2 - 1
    frequency = torch.rand(rows, device="cuda", generator=g) * 2 - 1
    repetition = torch.rand(rows, device="cuda", generator=g) * 1.5 + 0.5
    neutral = torch.rand(rows, device="cuda", generator=g) < 0.3
    presence[neutral], frequency[neutral], repetition[neutral] = 0.0, 0.0, 1.0
    return counts, in_prompt, slots, presence, frequency, repetition


def place_ties(logits, noise, g):
    """Make each row's best score a tie between several positions: adjacent (one 16-byte vector), four apart
    (another thread), and the row's first and last (other splits), in a random subset. The same logit and noise
    give the same score whatever the arithmetic, so torch's first index is the only right answer."""
    rows, vocab = logits.shape
    for row in range(rows):
        spots = sorted({0, 1, 5, vocab // 2, vocab // 2 + 1, vocab - 1} & set(range(vocab)))
        chosen = [s for s in spots if torch.rand((), generator=g, device="cuda").item() < 0.6] or spots[-1:]
        logits[row, chosen] = 40.0
        noise[row, chosen] = 0.5
    return logits, noise


def check_argmax(logits, noise, temperatures, penalties=()):
    poison_next_allocation((logits.shape[0],), torch.int64, -1)
    tokens = argmax_kernel(logits, noise, temperatures, penalties)
    expected = reference.sampler_gumbel_argmax(logits, noise, temperatures, *penalties)
    assert tokens.dtype == torch.int64 and tokens.shape == expected.shape
    wrong = (tokens != expected).nonzero().flatten().tolist()
    assert not wrong, (f"rows {wrong[:8]} of {logits.shape[0]} (vocab {logits.shape[1]}): kernel "
                       f"{tokens[wrong[:8]].tolist()}, torch {expected[wrong[:8]].tolist()}")


def check_lse(logits, tokens):
    poison_next_allocation((logits.shape[0],), torch.float32, float("nan"))
    lse, above = lse_kernel(logits, tokens)
    expected_lse, expected_above = reference.sampler_logsumexp_rank(logits, tokens)
    assert lse.dtype == torch.float32 and above.dtype == torch.int64
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)  # atol: log-sum-exps near 0
    assert torch.equal(above, expected_above), (above - expected_above).nonzero()[:8].tolist()


def random_case(seed):
    random.seed(seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = random.choice([1, 2, 3, 8, 64, random.randint(1, 300)])
    return rows, VOCABS[seed % len(VOCABS)], g


def exponential_noise(rows, vocab, g):
    """Exp(1) draws as the sampler makes them, kept off 0: a zero draw at a -inf logit would make a NaN score,
    which torch.argmax picks and the kernel, by design, does not."""
    return torch.empty(rows, vocab, device="cuda").exponential_(generator=g).clamp_(min=1e-20)


@pytest.mark.parametrize("with_penalties", [False, True])
@pytest.mark.parametrize("seed", range(15))
def test_gumbel_argmax_random_shapes(seed, with_penalties):
    rows, vocab, g = random_case(seed)
    logits = random_logits(rows, vocab, g)
    noise = exponential_noise(rows, vocab, g)
    penalties = random_penalties(rows, vocab, g) if with_penalties else ()
    check_argmax(logits, noise, random_temperatures(rows, g), penalties)


@pytest.mark.parametrize("with_penalties", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("vocab", VOCABS)
def test_gumbel_argmax_ties_go_to_the_first_index(vocab, rows, with_penalties):
    g = torch.Generator(device="cuda").manual_seed(vocab + rows)
    logits = random_logits(rows, vocab, g, neg_inf=False)
    noise = torch.empty(rows, vocab, device="cuda").exponential_(generator=g).clamp(min=0.6)  # the ties win
    logits, noise = place_ties(logits, noise, g)
    temperatures = random_temperatures(rows, g).clamp(min=0.5)
    if with_penalties:  # neutral values at the tied positions' slots keep the tie exact
        penalties = random_penalties(rows, vocab, g)
        penalties[0].zero_(), penalties[1].zero_()
        check_argmax(logits, noise, temperatures, penalties)
    else:
        check_argmax(logits, noise, temperatures)


def test_gumbel_argmax_all_neg_inf_rows_give_token_0():
    logits = torch.full((5, 151936), float("-inf"), device="cuda")
    noise = torch.rand(5, 151936, device="cuda") + 0.5
    tokens = argmax_kernel(logits, noise, torch.ones(5, device="cuda"))
    assert tokens.tolist() == [0] * 5
    check_argmax(logits, noise, torch.ones(5, device="cuda"))


@pytest.mark.parametrize("vocab", [151936, 1000])
def test_gumbel_argmax_unaligned_rows_take_the_element_path(vocab):
    """Logits and noise that start 4 bytes past a 16-byte boundary: the vector loads must not be used."""
    g = torch.Generator(device="cuda").manual_seed(vocab)
    rows = 9
    logits = torch.randn(rows * vocab + 1, device="cuda", generator=g)[1:].view(rows, vocab)
    noise = torch.empty(rows * vocab + 1, device="cuda").exponential_(generator=g)[1:].view(rows, vocab)
    check_argmax(logits, noise, random_temperatures(rows, g), random_penalties(rows, vocab, g))
    check_lse(logits, torch.randint(0, vocab, (rows,), device="cuda", generator=g))


def test_penalties_change_the_token():
    """A penalty the kernel ignored would leave the token as it is without penalties: here it must not."""
    vocab = 1000
    logits = torch.zeros(1, vocab, device="cuda")
    logits[0, 10] = 5.0
    logits[0, 20] = 4.0
    noise = torch.ones(1, vocab, device="cuda")
    counts = torch.zeros(1, vocab, dtype=torch.int32, device="cuda")
    counts[0, 10] = 1
    penalties = (counts, torch.zeros(1, vocab, dtype=torch.bool, device="cuda"), torch.zeros(1, dtype=torch.int64,
                 device="cuda"), torch.full((1,), 2.0, device="cuda"), torch.zeros(1, device="cuda"),
                 torch.ones(1, device="cuda"))
    t = torch.ones(1, device="cuda")
    assert argmax_kernel(logits, noise, t).item() == 10
    assert argmax_kernel(logits, noise, t, penalties).item() == 20
    check_argmax(logits, noise, t, penalties)


@pytest.mark.parametrize("seed", range(15))
def test_logsumexp_rank_random_shapes(seed):
    rows, vocab, g = random_case(seed)
    logits = random_logits(rows, vocab, g)
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    check_lse(logits, tokens)


@pytest.mark.parametrize("rows", [1, 8, 257])
@pytest.mark.parametrize("vocab", VOCABS)
def test_logsumexp_rank_counts_strictly_above_with_many_equal_logits(vocab, rows):
    """Integer logits: many equal the chosen one, and a count of >= instead of > is far off."""
    g = torch.Generator(device="cuda").manual_seed(vocab * rows)
    logits = torch.randint(-6, 6, (rows, vocab), device="cuda", generator=g).float()
    tokens = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    check_lse(logits, tokens)


def test_logsumexp_rank_infinities():
    logits = torch.randn(4, 1000, device="cuda")
    logits[0] = float("-inf")
    logits[1, 3] = float("inf")
    logits[2, ::2] = float("-inf")
    tokens = torch.tensor([0, 3, 2, 7], device="cuda")
    lse, above = lse_kernel(logits, tokens)
    assert lse[0].item() == float("-inf") and lse[1].item() == float("inf")
    assert above.tolist()[:2] == [0, 0]
    check_lse(logits, tokens)


def test_cuda_graph_replay_follows_new_inputs():
    """Captured once, replayed with other data at the same addresses: nothing in the launches may depend on the
    data, and the split counters must be back at zero after every launch (the second replay shows it)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    rows, vocab = 8, 151936
    logits = random_logits(rows, vocab, g)
    noise = exponential_noise(rows, vocab, g)
    temperatures = random_temperatures(rows, g)
    penalties = random_penalties(rows, vocab, g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: it allocates the split counters
        argmax_kernel(logits, noise, temperatures)
        tokens = argmax_kernel(logits, noise, temperatures, penalties)
        lse_kernel(logits, tokens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plain = argmax_kernel(logits, noise, temperatures)
        tokens = argmax_kernel(logits, noise, temperatures, penalties)
        lse, above = lse_kernel(logits, tokens)
    for _ in range(2):
        logits.copy_(random_logits(rows, vocab, g))
        noise.copy_(exponential_noise(rows, vocab, g))
        temperatures.copy_(random_temperatures(rows, g))
        for table, new in zip(penalties, random_penalties(rows, vocab, g)):
            if table.shape == new.shape:
                table.copy_(new)
        penalties[2].random_(0, penalties[0].shape[0], generator=g)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(plain, reference.sampler_gumbel_argmax(logits, noise, temperatures))
        assert torch.equal(tokens, reference.sampler_gumbel_argmax(logits, noise, temperatures, *penalties))
        expected_lse, expected_above = reference.sampler_logsumexp_rank(logits, tokens)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
        assert torch.equal(above, expected_above)


def test_wrappers_choose_the_kernel_only_where_it_applies():
    g = torch.Generator(device="cuda").manual_seed(2)
    logits = random_logits(3, 1000, g)
    noise = torch.empty(3, 1000, device="cuda").exponential_(generator=g)
    t = torch.ones(3, device="cuda")
    assert ops.sampler_kernels_fit(logits) and not ops.sampler_kernels_fit(logits.bfloat16())
    assert not ops.sampler_kernels_fit(logits.t().contiguous().t())
    assert torch.equal(ops.sampler_gumbel_argmax(logits, noise, t), argmax_kernel(logits, noise, t))
    assert torch.equal(ops.sampler_gumbel_argmax(logits.bfloat16(), noise, t),
                       reference.sampler_gumbel_argmax(logits.bfloat16(), noise, t))
    tokens = ops.sampler_gumbel_argmax(logits, noise, t)
    assert torch.equal(ops.sampler_logsumexp_rank(logits, tokens)[1], lse_kernel(logits, tokens)[1])


def test_bad_inputs_are_refused():
    logits = torch.randn(4, 1000, device="cuda")
    noise = torch.rand(4, 1000, device="cuda") + 0.1
    t = torch.ones(4, device="cuda")
    tokens = torch.zeros(4, dtype=torch.int64, device="cuda")
    pen = random_penalties(4, 1000, torch.Generator(device="cuda").manual_seed(0))
    refusals = [
        (lambda: argmax_kernel(logits.cpu(), noise, t), "logits must be a CUDA tensor"),
        (lambda: argmax_kernel(logits.cpu(), noise.cpu(), t.cpu()), "'CPU' backend"),  # no CPU kernel registered
        (lambda: argmax_kernel(logits.half(), noise, t), "logits must be Float"),
        (lambda: argmax_kernel(logits[0], noise[0], t), r"logits must be \[num_rows, vocab\]"),
        (lambda: argmax_kernel(logits.t(), noise.t(), t), "logits must be contiguous"),
        (lambda: argmax_kernel(logits, noise[:, :999], t), "noise must have logits' shape"),
        (lambda: argmax_kernel(logits, noise.double(), t), "noise must be Float"),
        (lambda: argmax_kernel(logits, noise, t[:3]), r"temperatures must be \[num_rows=4\]"),
        (lambda: argmax_kernel(logits, noise, t.half()), "temperatures must be Float"),
        (lambda: argmax_kernel(logits, noise, t.cpu()), "temperatures must be on logits' device"),
        (lambda: argmax_kernel(logits, noise, t, pen[:1]), "must be given all together or not at all, got 1 of 6"),
        (lambda: argmax_kernel(logits, noise, t, (pen[0].long(), *pen[1:])), "output_counts must be Int"),
        (lambda: argmax_kernel(logits, noise, t, (pen[0], pen[1][:, :10], *pen[2:])),
         r"in_prompt must be \[num_slots, vocab=1000\]"),
        (lambda: argmax_kernel(logits, noise, t, (*pen[:2], pen[2].int(), *pen[3:])), "slots must be Long"),
        (lambda: argmax_kernel(logits, noise, t, (*pen[:5], pen[5][:2])), r"repetition must be \[num_rows=4\]"),
        (lambda: lse_kernel(logits, tokens.int()), "tokens must be Long"),
        (lambda: lse_kernel(logits, tokens[:2]), r"tokens must be \[num_rows=4\]"),
        (lambda: lse_kernel(logits.half(), tokens), "sampler_logsumexp_rank: logits must be Float"),
    ]
    for call, message in refusals:
        with pytest.raises(RuntimeError, match=message):
            call()
