"""The fused q/k norm + rotary + KV-cache write kernel against the torch reference: random shapes, GQA ratios,
with and without norm weights, padded qkv rows, scattered pages and padding slots; caches poisoned with NaN
so an unwritten slot shows; capture in a CUDA graph; the refusals of bad input."""

import random
import re

import pytest
import torch

from minivllm.ops import KERNELS_BUILT, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)

EPS = 1e-6


def kernel(*args):
    torch.ops.minivllm.qk_norm_rope_cache(*args)


def assert_rounding_close(actual, expected, dtype, what):
    """Equal up to a few roundings to dtype (the kernel and the reference round at the same points, but their
    fp32 arithmetic differs), measured against the largest value of each head."""
    scale = expected.float().abs().amax(-1, keepdim=True).clamp(min=1.0)
    ratio = ((actual.float() - expected.float()).abs() / (4 * torch.finfo(dtype).eps * scale)).max().item()
    assert ratio <= 1.0, f"{what}: error {ratio:.2f}x the {dtype} tolerance"


def make_case(rng: random.Random, num_tokens, num_heads, num_kv_heads, head_dim, dtype, block_size, normed, pad):
    g = torch.Generator(device="cuda").manual_seed(rng.randrange(1 << 30))
    width = (num_heads + 2 * num_kv_heads) * head_dim
    buffer = torch.randn(num_tokens, width + pad, device="cuda", generator=g).to(dtype)
    buffer[:, width:] = float("nan")  # outside the heads: never read or written
    max_position = rng.randint(1, 4096)
    positions = torch.randint(0, max_position, (num_tokens,), device="cuda", generator=g)
    # uniform in [-1, 1] like real tables, but the two halves of a row differ, so each index is checked
    cos = torch.rand(max_position, head_dim, device="cuda", generator=g) * 2 - 1
    sin = torch.rand(max_position, head_dim, device="cuda", generator=g) * 2 - 1
    weights = [None, None]
    if normed:
        weights = [(torch.rand(head_dim, device="cuda", generator=g) + 0.5).to(dtype) for _ in range(2)]
    # tokens fill randomly chosen, non-contiguous blocks in order, as a sequence's pages do; some are padding
    num_blocks = (num_tokens + block_size - 1) // block_size + rng.randint(0, 5)
    blocks = rng.sample(range(num_blocks), (num_tokens + block_size - 1) // block_size)
    slots = [blocks[i // block_size] * block_size + i % block_size for i in range(num_tokens)]
    slots = torch.tensor([-1 if rng.random() < 0.15 else s for s in slots], dtype=torch.int64, device="cuda")
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device="cuda")
    return buffer, positions, cos, sin, weights, k_cache, v_cache, slots


def heads_of(buffer, num_heads, num_kv_heads, head_dim):
    width = (num_heads + 2 * num_kv_heads) * head_dim
    return buffer[:, :width].unflatten(1, (-1, head_dim)).split([num_heads, num_kv_heads, num_kv_heads], dim=1)


def check_against_reference(num_tokens, num_heads, num_kv_heads, head_dim, dtype, block_size, normed, pad, seed):
    rng = random.Random(seed)
    case = make_case(rng, num_tokens, num_heads, num_kv_heads, head_dim, dtype, block_size, normed, pad)
    buffer, positions, cos, sin, (q_weight, k_weight), k_cache, v_cache, slots = case
    before = buffer.clone()
    width = (num_heads + 2 * num_kv_heads) * head_dim
    ref_buffer, ref_k_cache, ref_v_cache = buffer.clone(), k_cache.clone(), v_cache.clone()

    kernel(buffer[:, :width], positions, cos, sin, q_weight, k_weight, EPS, k_cache, v_cache, slots, num_heads,
           num_kv_heads)
    reference.qk_norm_rope_cache(ref_buffer[:, :width], positions, cos, sin, q_weight, k_weight, EPS, ref_k_cache,
                                 ref_v_cache, slots, num_heads, num_kv_heads)

    q, k, v = heads_of(buffer, num_heads, num_kv_heads, head_dim)
    ref_q, ref_k, _ = heads_of(ref_buffer, num_heads, num_kv_heads, head_dim)
    _, _, v_before = heads_of(before, num_heads, num_kv_heads, head_dim)
    assert_rounding_close(q, ref_q, dtype, "q")
    assert_rounding_close(k, ref_k, dtype, "k")
    assert torch.equal(v, v_before), "v must be left as it is"
    assert buffer[:, width:].isnan().all(), "the row padding past the heads was written"
    written = slots >= 0
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots[written]], k[written]), "k_cache must hold the normed, rotated k"
    assert torch.equal(flat_v[slots[written]], v[written]), "v_cache must hold v"
    unwritten = torch.ones(flat_k.shape[0], dtype=torch.bool, device="cuda")
    unwritten[slots[written]] = False
    assert flat_k[unwritten].isnan().all() and flat_v[unwritten].isnan().all(), "a slot not in slot_mapping changed"


EDGE_TOKENS = [1, 15, 16, 17, 300]


@pytest.mark.parametrize("seed", range(120))
def test_random_cases_match_reference(seed):
    rng = random.Random(seed)
    num_tokens = EDGE_TOKENS[seed % len(EDGE_TOKENS)] if seed < 40 else rng.randint(1, 300)
    group = rng.choice([1, 2, 4, 8])
    num_kv_heads = rng.choice([1, 2, 3, 4])
    check_against_reference(
        num_tokens, group * num_kv_heads, num_kv_heads, head_dim=rng.choice([64, 128]),
        dtype=rng.choice([torch.float16, torch.bfloat16]), block_size=rng.choice([16, 32, 256]),
        normed=rng.random() < 0.5, pad=rng.choice([0, 0, 8, 64]), seed=seed,
    )


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normed", [False, True])
def test_qwen3_like_shapes(head_dim, dtype, normed):
    """Qwen3-0.6B's attention (16 q heads, 8 kv heads) at decode and prefill sizes."""
    for num_tokens in (1, 8, 257):
        check_against_reference(num_tokens, 16, 8, head_dim, dtype, 16, normed, pad=0, seed=num_tokens)


def test_wrapper_runs_the_kernel_and_empty_caches_skip_the_write():
    """The engine's profiling forward passes the attention layers' empty caches: q and k still transform."""
    from minivllm import ops

    rng = random.Random(5)
    buffer, positions, cos, sin, (q_weight, k_weight), _, _, slots = make_case(
        rng, 33, 8, 2, 128, torch.bfloat16, 16, True, 0
    )
    expected = buffer.clone()
    reference.qk_norm_rope_cache(expected, positions, cos, sin, q_weight, k_weight, EPS, torch.tensor([]),
                                 torch.tensor([]), slots, 8, 2)
    for empty in (torch.tensor([], device="cuda"), torch.empty(0, 16, 2, 128, dtype=torch.bfloat16, device="cuda")):
        qkv = buffer.clone()
        ops.qk_norm_rope_cache(qkv, positions, cos, sin, q_weight, k_weight, EPS, empty, empty, slots, 8, 2)
        assert_rounding_close(qkv, expected, torch.bfloat16, "qkv")
        assert not torch.equal(qkv, buffer)


def test_all_padding_slots_and_no_tokens():
    rng = random.Random(6)
    buffer, positions, cos, sin, weights, k_cache, v_cache, slots = make_case(
        rng, 20, 4, 4, 64, torch.float16, 32, True, 8
    )
    kernel(buffer[:, :768], positions, cos, sin, *weights, EPS, k_cache, v_cache, torch.full_like(slots, -1), 4, 4)
    assert k_cache.isnan().all() and v_cache.isnan().all()
    empty = buffer[:0, :768]
    kernel(empty, positions[:0], cos, sin, *weights, EPS, k_cache, v_cache, slots[:0], 4, 4)


def test_cuda_graph_replay_follows_new_inputs():
    """Captured once, replayed with other data at the same addresses: the launch must not depend on data."""
    num_heads, num_kv_heads, head_dim, dtype = 8, 4, 128, torch.bfloat16
    rng = random.Random(7)
    buffer, positions, cos, sin, weights, k_cache, v_cache, slots = make_case(
        rng, 16, num_heads, num_kv_heads, head_dim, dtype, 16, True, 0
    )
    width = buffer.shape[1]
    qkv = torch.empty_like(buffer)
    args = (qkv, positions, cos, sin, *weights, EPS, k_cache, v_cache, slots, num_heads, num_kv_heads)
    qkv.copy_(buffer)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel(*args)

    new = make_case(random.Random(8), 16, num_heads, num_kv_heads, head_dim, dtype, 16, True, 0)
    new_positions = new[1] % cos.shape[0]
    qkv.copy_(new[0])
    positions.copy_(new_positions)
    slots.copy_(torch.randperm(k_cache.shape[0] * 16, device="cuda")[:16])
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    expected = new[0].clone()
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    reference.qk_norm_rope_cache(expected, new_positions, cos, sin, *weights, EPS, ref_k_cache, ref_v_cache, slots,
                                 num_heads, num_kv_heads)
    graph.replay()
    torch.cuda.synchronize()
    assert_rounding_close(qkv[:, :width], expected[:, :width], dtype, "qkv after replay")
    written = k_cache.view(-1, num_kv_heads, head_dim)[slots]
    assert_rounding_close(written, ref_k_cache.view(-1, num_kv_heads, head_dim)[slots], dtype, "k_cache after replay")


def valid_args(**changes):
    """T 3, 4 q heads, 2 kv heads, head_dim 64, fp16."""
    args = dict(
        qkv=torch.randn(3, 8 * 64, device="cuda", dtype=torch.float16),
        positions=torch.tensor([0, 1, 7], device="cuda"),
        cos=torch.rand(8, 64, device="cuda"),
        sin=torch.rand(8, 64, device="cuda"),
        q_weight=torch.rand(64, device="cuda", dtype=torch.float16),
        k_weight=torch.rand(64, device="cuda", dtype=torch.float16),
        eps=EPS,
        k_cache=torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.float16),
        v_cache=torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.float16),
        slot_mapping=torch.tensor([0, 5, 17], dtype=torch.int64, device="cuda"),
        num_heads=4,
        num_kv_heads=2,
    )
    args.update(changes)
    return args


def test_valid_args_run():
    args = valid_args()
    kernel(*args.values())
    assert torch.equal(args["k_cache"][1, 1], args["qkv"][2, 256:384].view(2, 64))


def cuda(*shape, dtype=torch.float16):
    return torch.rand(*shape, device="cuda").to(dtype)


BAD_INPUTS = [
    (lambda: dict(qkv=cuda(3, 512, dtype=torch.float32)), "dtype Float is not supported"),
    (lambda: dict(qkv=torch.randn(3, 512, dtype=torch.float16)), "qkv must be a CUDA tensor"),
    (lambda: dict(num_heads=3), "qkv must be [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]"),
    (lambda: dict(num_kv_heads=0), "num_kv_heads 0 must be positive"),
    (lambda: dict(qkv=cuda(3, 8 * 96)), "head_dim 96 is not supported; supported: 64, 128"),
    (lambda: dict(qkv=cuda(3, 516)[:, :512]), "row stride that is a multiple of 8"),
    (lambda: dict(qkv=cuda(3, 1024)[:, ::2]), "contiguous in its last dimension"),
    (lambda: dict(positions=torch.tensor([0, 1, 7], device="cuda").int()), "positions must be torch.int64"),
    (lambda: dict(positions=torch.tensor([0, 1], device="cuda")), "positions must be a contiguous [num_tokens] = [3]"),
    (lambda: dict(slot_mapping=torch.tensor([0, 5, 17], device="cuda").int()), "slot_mapping must be torch.int64"),
    (lambda: dict(slot_mapping=torch.tensor([0, 5, 17])), "slot_mapping must be a CUDA tensor"),
    (lambda: dict(cos=cuda(8, 64)), "cos must be torch.float32, got Half"),
    (lambda: dict(sin=torch.rand(8, 128, device="cuda")), "sin must be a contiguous [max_position, head_dim=64]"),
    (lambda: dict(sin=torch.rand(9, 64, device="cuda")), "sin shape [9, 64] differs from cos shape [8, 64]"),
    (lambda: dict(q_weight=cuda(65)), "q_weight must be a contiguous [head_dim] = [64] tensor, got shape [65]"),
    (lambda: dict(k_weight=torch.rand(64, device="cuda")), "k_weight must have qkv's dtype Half, got Float"),
    (lambda: dict(eps=float("nan")), "eps must be a finite number"),
    (lambda: dict(k_cache=cuda(4, 16, 4, 64), v_cache=cuda(4, 16, 4, 64)), "num_kv_heads=2, head_dim=64], got shapes"),
    (lambda: dict(v_cache=cuda(4, 16, 2, 64, dtype=torch.bfloat16)), "must have qkv's dtype Half"),
    (lambda: dict(k_cache=cuda(4, 2, 16, 64).transpose(1, 2)), "k_cache and v_cache must be contiguous"),
    (lambda: dict(k_cache=torch.zeros(4, 16, 2, 64, dtype=torch.float16)), "k_cache must be a CUDA tensor"),
]


@pytest.mark.parametrize("make_changes, message", BAD_INPUTS)
def test_bad_inputs_are_refused(make_changes, message):
    changes = make_changes()  # built inside the test: collection must not touch CUDA
    with pytest.raises(RuntimeError, match=re.escape(message)):
        kernel(*valid_args(**changes).values())
