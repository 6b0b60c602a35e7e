"""The paged-attention decode kernel against the fp32 torch reference: random shapes and page layouts,
mixed-length batches (very long next to very short, empty rows, tile edges, more than 256 rows), a part
of the heads cut as the whole (split_kv_heads), CUDA-graph replay, and the refusals of bad input."""

import math
import random

import pytest
import torch

from minivllm.ops import KERNELS_BUILT, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)

# Largest per-row relative error ||out - ref|| / ||ref|| allowed: a few times the output's own rounding.
ROW_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
EDGE_LENGTHS = [1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 4096]
KV_GROUPS = [(8, 1), (8, 2), (4, 4), (2, 8), (4, 2), (1, 16), (3, 3), (1, 12), (2, 1)]  # (num_kv_heads, group)


def decode(*args):
    return torch.ops.minivllm.paged_attention_decode(*args)


def poison_allocator(num_bytes: int) -> None:
    """Leave 0xff bytes (NaN in fp16 and bf16) in the caching allocator's next block of this size, so an
    output element the kernel forgets to write shows up as NaN."""
    torch.empty(num_bytes, dtype=torch.uint8, device="cuda").fill_(255)


def make_pages(rng: random.Random, lengths, block_size, num_kv_heads, head_dim, dtype, extra_columns):
    """Caches whose pages are shuffled among the sequences and whose every slot not holding a token of
    some sequence is NaN; block tables whose entries past each sequence's last page point at NaN pages.
    Returns the caches, the tables and the caches with NaN replaced by zeros (for the reference)."""
    pages_needed = [math.ceil(n / block_size) for n in lengths]
    max_blocks = max(pages_needed + [1]) + extra_columns
    num_spare = 4
    num_blocks = sum(pages_needed) + num_spare
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda").to(dtype)
    v_cache = torch.randn(shape, device="cuda").to(dtype)
    order = list(range(num_blocks))
    rng.shuffle(order)
    spare = order[:num_spare]
    used = iter(order[num_spare:])
    tables = torch.empty(len(lengths), max_blocks, dtype=torch.int32)
    valid = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, (n, pages) in enumerate(zip(lengths, pages_needed)):
        for j in range(max_blocks):
            if j < pages:
                page = next(used)
                tables[b, j] = page
                valid[page, : min(block_size, n - j * block_size)] = True
            else:
                tables[b, j] = rng.choice(spare)
    valid = valid.cuda()[..., None, None]
    clean_k = torch.where(valid, k_cache, 0)
    clean_v = torch.where(valid, v_cache, 0)
    k_cache.masked_fill_(~valid, float("nan"))
    v_cache.masked_fill_(~valid, float("nan"))
    return k_cache, v_cache, tables.cuda(), clean_k, clean_v


def reference_fp32(q, k_cache, v_cache, tables, lens, scale):
    out = reference.paged_attention_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    return torch.where((lens > 0).view(-1, 1, 1), out, 0.0)  # no keys: the kernel's contract is zeros


def reference_per_sequence(q, k_cache, v_cache, tables, lengths, scale):
    """The fp32 reference one sequence at a time: batches of very different lengths, which the vectorised
    reference would pad to the longest."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, length in enumerate(lengths):
        if length:
            k = reference.gather_pages(k_cache, tables[b], length).float()
            v = reference.gather_pages(v_cache, tables[b], length).float()
            out[b : b + 1] = reference.attend(q[b : b + 1].float(), k, v, scale, causal=False)
    return out


def check_close(out, ref, dtype):
    assert out.dtype == dtype
    assert not out.isnan().any(), "NaN in the kernel's output"
    diff = (out.float() - ref).flatten(-2).norm(dim=-1)  # per (sequence, head) row
    norm = ref.flatten(-2).norm(dim=-1)
    row_err = (diff / norm.clamp(min=1e-6)).max().item()
    assert row_err < ROW_TOLERANCE[dtype], f"max row relative error {row_err:.2e}"
    return row_err


def run_case(rng, batch, num_heads, num_kv_heads, head_dim, dtype, block_size, lengths, strided_q, total=None):
    """total: the total_context_len to pass (None: the kernel sums context_lens; "sum": pass the true sum)."""
    k_cache, v_cache, tables, clean_k, clean_v = make_pages(
        rng, lengths, block_size, num_kv_heads, head_dim, dtype, extra_columns=rng.randint(0, 3)
    )
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    # Magnitude 3: peakier attention, so a wrong or missing key shows more.
    q_magnitude = rng.choice([1.0, 3.0])
    if strided_q:  # q as a slice of a fused qkv projection: batch stride covers q, k and v heads
        qkv = (q_magnitude * torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, device="cuda")).to(dtype)
        q = qkv[:, :num_heads]
    else:
        q = (q_magnitude * torch.randn(batch, num_heads, head_dim, device="cuda")).to(dtype)
    scale = head_dim**-0.5
    if total is not None:
        total = torch.tensor([sum(lengths) if total == "sum" else total], dtype=torch.int64, device="cuda")
    poison_allocator(batch * num_heads * head_dim * 2)
    out = decode(q, k_cache, v_cache, tables, lens, scale, total)
    return check_close(out, reference_fp32(q, clean_k, clean_v, tables, lens, scale), dtype)


def random_case(seed: int):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float16, torch.bfloat16])
    head_dim = rng.choice([64, 128])
    num_kv_heads, group = rng.choice(KV_GROUPS)
    block_size = rng.choice([16, 16, 32, 32, 256, 64, 128])
    batch = rng.choice([1, 1, 2, 3, 5, 8, 16, 33, 64])
    max_len = rng.choice([64, 300, 1024, 4096])
    lengths = [rng.choice(EDGE_LENGTHS) if rng.random() < 0.3 else rng.randint(1, max_len) for _ in range(batch)]
    # Keep the gathered reference small: it pads every sequence to the longest.
    while batch * max(lengths) > 1 << 17 and batch > 1:
        batch //= 2
        lengths = lengths[:batch]
    strided_q, total = rng.random() < 0.5, rng.choice([None, "sum"])
    return rng, batch, num_kv_heads * group, num_kv_heads, head_dim, dtype, block_size, lengths, strided_q, total


@pytest.mark.parametrize("seed", range(120))
def test_random_cases(seed):
    run_case(*random_case(seed))


def mixed_lengths(rng: random.Random, pattern: str, batch: int) -> list[int]:
    """Batches of very different lengths, where a work split by length goes wrong first: very long contexts
    among short or empty ones, lengths on tile edges, padding rows of context 0, hundreds of rows."""
    if pattern == "long among short":
        lengths = [rng.randint(0, 100) for _ in range(batch)]
        for b in rng.sample(range(batch), max(1, batch // 50)):
            lengths[b] = rng.randint(8000, 40000)
    elif pattern == "tile edges":
        lengths = [rng.choice([0, 1, 63, 64, 65, 127, 128, 129, rng.randint(1, 3000)]) for _ in range(batch)]
    elif pattern == "workload":  # as benchmarks.throughput's batches
        lengths = [rng.randint(100, 2000) for _ in range(batch)]
    elif pattern == "padded":  # a captured batch: real rows, then padding rows of context 0
        real = rng.randint(1, batch)
        lengths = [rng.randint(1, 5000) for _ in range(real)] + [0] * (batch - real)
    elif pattern == "one long":
        lengths = [rng.randint(20000, 50000)] + [rng.choice([0, 1]) for _ in range(batch - 1)]
        rng.shuffle(lengths)
    else:  # "all short": hundreds of tiny contexts
        lengths = [rng.randint(0, 16) for _ in range(batch)]
    return lengths


MIXED_PATTERNS = ["long among short", "tile edges", "workload", "padded", "one long", "all short"]


@pytest.mark.parametrize("seed", range(48))
def test_mixed_length_batches(seed):
    rng = random.Random(1000 + seed)
    pattern = MIXED_PATTERNS[seed % len(MIXED_PATTERNS)]
    num_kv_heads, group = KV_GROUPS[seed % len(KV_GROUPS)]
    num_heads, dtype = num_kv_heads * group, rng.choice([torch.float16, torch.bfloat16])
    head_dim, block_size = rng.choice([64, 128]), rng.choice([16, 256, 16, 256, 32])
    batch = rng.choice([2, 7, 64, 257, 300] if pattern != "all short" else [64, 300, 600])
    lengths = mixed_lengths(rng, pattern, batch)
    k_cache, v_cache, tables, clean_k, clean_v = make_pages(
        rng, lengths, block_size, num_kv_heads, head_dim, dtype, extra_columns=rng.randint(0, 2)
    )
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = (rng.choice([1.0, 3.0]) * torch.randn(batch, num_heads, head_dim, device="cuda")).to(dtype)
    poison_allocator(batch * num_heads * head_dim * 2)
    out = decode(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    check_close(out, reference_per_sequence(q, clean_k, clean_v, tables, lengths, head_dim**-0.5), dtype)
    assert (out[lens == 0] == 0).all()


STRUCTURE_LENGTHS = [0, 1, 15, 16, 17, 48, 63, 64, 65, 80, 127, 128, 129, 200, 1000, 1024, 1040]


@pytest.mark.parametrize("total", ["sum", 1])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 12, 16, 24, 32])
def test_tile_and_split_edges(group, head_dim, total):
    """Where the kernel's own structure could go wrong: a warp takes 16-token chunks of a 64-token tile, a CTA
    serves up to 16 query heads (the mma's M), a split is whole tiles. Contexts of 0, 1, part of a chunk, one
    chunk, one tile and one past; groups filling part of the 16 rows, all of them, and more than one CTA's worth
    (24, 32); splits of one tile each (a total of 1 sizes the smallest splits) and of several tiles (the true
    total: tile boundaries inside a split)."""
    rng = random.Random(group * 1000 + head_dim + (total == 1))
    num_kv_heads = 2 if group <= 16 else 1
    dtype = torch.bfloat16 if group % 2 else torch.float16
    block_size = [16, 256, 32][group % 3]
    lengths = STRUCTURE_LENGTHS[:]
    rng.shuffle(lengths)
    batch = len(lengths)
    run_case(rng, batch, num_kv_heads * group, num_kv_heads, head_dim, dtype, block_size, lengths, False, total)


@pytest.mark.parametrize("total", [0, -7, 1, "sum", 3 << 20, 1 << 62])
@pytest.mark.parametrize("lengths", [[5000, 64, 1, 0, 3000, 129, 2048, 700], [40000], [100] * 300])
def test_total_context_len_only_sizes_the_splits(lengths, total):
    """The total only chooses how finely contexts are split: a wrong one (too small, negative, huge) must still
    give the right output, one split per sequence up to the grid's most."""
    run_case(random.Random(len(lengths)), len(lengths), 16, 8, 128, torch.bfloat16, 16, lengths, False, total)


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_context(block_size, dtype):
    rng = random.Random(block_size)
    run_case(rng, 2, 16, 8, 128, dtype, block_size, [32768, 20001], strided_q=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lengths",
    [[5000, 64, 1, 0, 3000, 129, 2048, 700], [40000], [300] * 40, [33] * 300, [7, 0, 30000] + [65] * 290 + [0] * 9],
)
def test_split_kv_heads_gives_a_part_of_the_heads_the_same_bits(lengths, dtype):
    """A tensor-parallel rank holds a part of the KV heads. Told the whole model's count (split_kv_heads), it
    must cut every context where the whole model's launch does, so that its heads come out bit for bit the
    same (tp_invariant); the grid and the split sizes otherwise depend on the heads a launch has."""
    rng = random.Random(len(lengths))
    num_heads, num_kv_heads, head_dim = 16, 8, 128
    k_cache, v_cache, tables, _, _ = make_pages(rng, lengths, 16, num_kv_heads, head_dim, dtype, 0)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), num_heads, head_dim, device="cuda").to(dtype)
    whole = decode(q, k_cache, v_cache, tables, lens, 0.088)
    for ranks in (2, 4, 8):
        heads, kv = num_heads // ranks, num_kv_heads // ranks
        for r in range(ranks):
            caches = (cache[:, :, r * kv:(r + 1) * kv].contiguous() for cache in (k_cache, v_cache))
            part = decode(q[:, r * heads:(r + 1) * heads], *caches, tables, lens, 0.088, None, num_kv_heads)
            assert torch.equal(part, whole[:, r * heads:(r + 1) * heads]), f"rank {r} of {ranks}"


def test_empty_and_single_token_rows():
    """Padding rows of a captured batch have context 0 (zeros out) or 1, among real rows."""
    rng = random.Random(0)
    lengths = [0, 1, 700, 0, 17, 1]
    k_cache, v_cache, tables, clean_k, clean_v = make_pages(rng, lengths, 16, 2, 128, torch.bfloat16, 1)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), 8, 128, device="cuda", dtype=torch.bfloat16)
    out = decode(q, k_cache, v_cache, tables, lens, 0.1)
    assert (out[lens == 0] == 0).all()
    check_close(out, reference_fp32(q, clean_k, clean_v, tables, lens, 0.1), torch.bfloat16)


@pytest.mark.parametrize("with_total", [False, True])  # the kernel's own sum, or the caller's
@pytest.mark.parametrize("batch", [1, 64, 300])  # from many splits a sequence to one
def test_cuda_graph_replay(batch, with_total):
    """Capture once, then copy new queries, pages, tables and lengths (and their total) into the captured
    buffers and replay: uniform, padded and one-long-among-short mixes, each equal to an eager call."""
    rng = random.Random(batch)
    num_heads, num_kv_heads, head_dim, block_size, dtype = 16, 8, 128, 16, torch.bfloat16
    max_blocks, num_blocks = 40, batch * 40 + 8
    capacity = max_blocks * block_size

    def fresh_lengths(mix):
        if mix == "padded":
            real = rng.randint(1, batch)
            return [rng.randint(1, capacity) for _ in range(real)] + [0] * (batch - real)
        if mix == "one long":
            lengths = [rng.choice([0, 1, 2]) for _ in range(batch)]
            lengths[rng.randrange(batch)] = capacity
            return lengths
        lengths = [rng.randint(0, capacity) for _ in range(batch)]
        lengths[0] = rng.choice([0, 1, capacity])
        return lengths

    def fresh_inputs(mix="uniform"):
        lengths = fresh_lengths(mix)
        k, v, tables, clean_k, clean_v = make_pages(rng, lengths, block_size, num_kv_heads, head_dim, dtype, 0)
        # Same shapes every time: pad tables to max_blocks and caches to num_blocks.
        full_tables = torch.randint(0, num_blocks, (batch, max_blocks), dtype=torch.int32, device="cuda")
        full_tables[:, : tables.shape[1]] = tables
        pad = num_blocks - k.shape[0]
        padded = (torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in (k, v, clean_k, clean_v))
        k, v, clean_k, clean_v = padded
        q = torch.randn(batch, num_heads, head_dim, device="cuda").to(dtype)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        total = torch.tensor([sum(lengths)], dtype=torch.int64, device="cuda") if with_total else None
        return (q, k, v, full_tables, lens, total), (clean_k, clean_v)

    buffers, _ = fresh_inputs()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    q, k, v, tables, lens, total = buffers
    with torch.cuda.stream(stream):
        decode(q, k, v, tables, lens, 0.088, total)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode(q, k, v, tables, lens, 0.088, total)

    for mix in ["uniform", "padded", "one long", "uniform"]:
        new, (clean_k, clean_v) = fresh_inputs(mix)
        for buffer, value in zip(buffers, new):
            if buffer is not None:
                buffer.copy_(value)
        out.fill_(float("nan"))
        graph.replay()
        check_close(out, reference_fp32(q, clean_k, clean_v, tables, lens, 0.088), dtype)
        assert torch.equal(out, decode(q, k, v, tables, lens, 0.088, total)), mix


def valid_args(**changes):
    args = dict(
        q=torch.randn(2, 8, 128, device="cuda", dtype=torch.float16),
        k_cache=torch.randn(4, 16, 2, 128, device="cuda", dtype=torch.float16),
        v_cache=torch.randn(4, 16, 2, 128, device="cuda", dtype=torch.float16),
        block_tables=torch.zeros(2, 2, dtype=torch.int32, device="cuda"),
        context_lens=torch.ones(2, dtype=torch.int32, device="cuda"),
        scale=0.1,
        total_context_len=None,
        split_kv_heads=None,
    )
    args.update(changes)
    return args


def test_valid_args_run():
    assert decode(*valid_args().values()).shape == (2, 8, 128)


@pytest.mark.parametrize(
    "make_changes, message",
    [
        (lambda: dict(q=torch.randn(2, 8, 96, device="cuda", dtype=torch.float16)), "head_dim 96"),
        (lambda: dict(q=torch.randn(2, 8, 128, device="cuda")), "Float"),
        (lambda: dict(q=torch.randn(2, 8, 128, dtype=torch.float16)), "CUDA"),
        (lambda: dict(q=torch.randn(2, 7, 128, device="cuda", dtype=torch.float16)), "multiple of num_kv_heads"),
        (lambda: dict(q=torch.randn(2, 128, 8, device="cuda", dtype=torch.float16).transpose(1, 2)), "last dimension"),
        (lambda: dict(k_cache=torch.randn(4, 16, 2, 128, device="cuda", dtype=torch.bfloat16)), "BFloat16"),
        (lambda: dict(k_cache=torch.randn(8, 8, 2, 128, device="cuda", dtype=torch.float16)), "v_cache shape"),
        (
            lambda: dict(
                k_cache=torch.randn(8, 8, 2, 128, device="cuda", dtype=torch.float16),
                v_cache=torch.randn(8, 8, 2, 128, device="cuda", dtype=torch.float16),
            ),
            "block_size 8",
        ),
        (
            lambda: dict(k_cache=torch.randn(4, 2, 16, 128, device="cuda", dtype=torch.float16).transpose(1, 2)),
            "contiguous",
        ),
        (lambda: dict(block_tables=torch.zeros(2, 2, dtype=torch.int64, device="cuda")), "Int"),
        (lambda: dict(block_tables=torch.zeros(3, 2, dtype=torch.int32, device="cuda")), "block_tables must be"),
        (lambda: dict(context_lens=torch.ones(3, dtype=torch.int32, device="cuda")), "context_lens must be"),
        (lambda: dict(context_lens=torch.ones(2, dtype=torch.int64, device="cuda")), "Int"),
        (lambda: dict(total_context_len=torch.ones(1, dtype=torch.int32, device="cuda")), "total_context_len"),
        (lambda: dict(total_context_len=torch.ones(2, dtype=torch.int64, device="cuda")), "total_context_len"),
        (lambda: dict(total_context_len=torch.ones(1, dtype=torch.int64)), "total_context_len"),
        (lambda: dict(split_kv_heads=1), "split_kv_heads 1 must be from num_kv_heads = 2"),
        (lambda: dict(split_kv_heads=1 << 17), "split_kv_heads 131072"),
    ],
)
def test_bad_inputs_are_refused(make_changes, message):
    changes = make_changes()  # built inside the test: collection must not touch CUDA
    with pytest.raises(RuntimeError, match=message):
        decode(*valid_args(**changes).values())
