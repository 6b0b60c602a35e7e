"""The KV-cache write kernel: exact copies into the right slots, padding slots skipped, every other slot
untouched, strided key/value views, and the refusals of bad input."""

import random

import pytest
import torch

from minivllm.ops import KERNELS_BUILT

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)


def write(*args):
    torch.ops.minivllm.reshape_and_cache(*args)


def key_value(rng, num_tokens, num_heads, num_kv_heads, head_dim, dtype, strided):
    """key and value [T, Hkv, D]; strided: slices of one fused qkv projection output, as the model gives them."""
    if strided:
        qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").to(dtype)
        k_begin = num_heads * head_dim
        v_begin = k_begin + num_kv_heads * head_dim
        key = qkv[:, k_begin:v_begin].unflatten(1, (num_kv_heads, head_dim))
        value = qkv[:, v_begin:].unflatten(1, (num_kv_heads, head_dim))
        return key, value
    shape = (num_tokens, num_kv_heads, head_dim)
    return torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)


@pytest.mark.parametrize("seed", range(40))
def test_random_writes(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float16, torch.bfloat16])
    head_dim = rng.choice([64, 128])
    num_kv_heads = rng.choice([1, 2, 3, 8])
    block_size = rng.choice([16, 32, 64, 256])
    num_blocks = rng.randint(1, 40)
    num_slots = num_blocks * block_size
    num_tokens = rng.randint(1, num_slots)
    slots = torch.tensor(rng.sample(range(num_slots), num_tokens), dtype=torch.int64)
    slots[torch.rand(num_tokens) < 0.2] = -1  # padding tokens of a captured batch
    slots = slots.cuda()
    key, value = key_value(rng, num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype, rng.random() < 0.5)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda").to(dtype)  # the poison every unwritten slot must keep
    v_cache = torch.randn(shape, device="cuda").to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    write(key, value, k_cache, v_cache, slots)

    expected_k, expected_v = k_before.view(num_slots, -1), v_before.view(num_slots, -1)
    written = slots >= 0
    expected_k[slots[written]] = key[written].flatten(1)
    expected_v[slots[written]] = value[written].flatten(1)
    assert torch.equal(k_cache.view(num_slots, -1), expected_k)
    assert torch.equal(v_cache.view(num_slots, -1), expected_v)


def test_all_padding_and_empty():
    k_cache = torch.randn(2, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    key = torch.randn(5, 2, 64, device="cuda", dtype=torch.bfloat16)
    write(key, key, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int64, device="cuda"))
    write(key[:0], key[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int64, device="cuda"))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def valid_args(**changes):
    args = dict(
        key=torch.randn(3, 2, 128, device="cuda", dtype=torch.float16),
        value=torch.randn(3, 2, 128, device="cuda", dtype=torch.float16),
        k_cache=torch.zeros(4, 16, 2, 128, device="cuda", dtype=torch.float16),
        v_cache=torch.zeros(4, 16, 2, 128, device="cuda", dtype=torch.float16),
        slot_mapping=torch.tensor([0, 5, 17], dtype=torch.int64, device="cuda"),
    )
    args.update(changes)
    return args


def test_valid_args_run():
    args = valid_args()
    write(*args.values())
    assert torch.equal(args["k_cache"][1, 1], args["key"][2])


@pytest.mark.parametrize(
    "make_changes, message",
    [
        (lambda: dict(slot_mapping=torch.tensor([0, 5, 17], dtype=torch.int32, device="cuda")), "Long"),
        (lambda: dict(slot_mapping=torch.tensor([0, 5], dtype=torch.int64, device="cuda")), "slot_mapping must be"),
        (lambda: dict(key=torch.randn(3, 2, 128, device="cuda", dtype=torch.bfloat16)), "BFloat16"),
        (lambda: dict(key=torch.randn(3, 2, 128, device="cuda"), value=torch.randn(3, 2, 128, device="cuda")), "Float"),
        (lambda: dict(key=torch.randn(3, 2, 128, dtype=torch.float16)), "CUDA"),
        (lambda: dict(key=torch.randn(3, 4, 128, device="cuda", dtype=torch.float16)), "key must be"),
        (lambda: dict(value=torch.randn(3, 2, 130, device="cuda", dtype=torch.float16)[..., 1:129]), "aligned"),
        (lambda: dict(key=torch.randn(3, 2, 136, device="cuda", dtype=torch.float16)[..., 4:132]), "aligned"),
        (lambda: dict(key=torch.randn(3, 2, 256, device="cuda", dtype=torch.float16)[..., ::2]), "last dimension"),
        (
            lambda: dict(
                k_cache=torch.zeros(4, 16, 2, 96, device="cuda", dtype=torch.float16),
                v_cache=torch.zeros(4, 16, 2, 96, device="cuda", dtype=torch.float16),
            ),
            "head_dim 96",
        ),
        (
            lambda: dict(
                k_cache=torch.zeros(4, 8, 2, 128, device="cuda", dtype=torch.float16),
                v_cache=torch.zeros(4, 8, 2, 128, device="cuda", dtype=torch.float16),
            ),
            "block_size 8",
        ),
        (
            lambda: dict(k_cache=torch.zeros(4, 2, 16, 128, device="cuda", dtype=torch.float16).transpose(1, 2)),
            "contiguous",
        ),
    ],
)
def test_bad_inputs_are_refused(make_changes, message):
    changes = make_changes()  # built inside the test: collection must not touch CUDA
    with pytest.raises(RuntimeError, match=message):
        write(*valid_args(**changes).values())
