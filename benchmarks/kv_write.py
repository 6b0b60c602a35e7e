"""KV-cache write (reshape_and_cache): our kernel against the torch reference (index_put) and the GPU's own
copy bandwidth measured in the same run. Tokens go to random slots of a cache twice their number, as
decode steps scatter them.

Ours is timed as CUDA-graph replays of back-to-back calls, each on its own inputs and slots, so small
writes are not served from L2; the reference cannot be captured (its mask indexing syncs) and runs eagerly.

    python -m benchmarks.kv_write [--json PATH]
"""

import math

import torch

from benchmarks.common import (
    copy_bandwidth_gbs,
    gpu_name,
    graph_time_ms,
    parser,
    print_table,
    require_cuda,
    time_cuda_ms,
    write_json,
)
from benchmarks.decode import L2_ROTATION_BYTES
from minivllm.ops import reference, reshape_and_cache

NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 8, 128, 16, torch.bfloat16
TOKEN_COUNTS = [256, 4096, 16384, 65536, 262144]


def measure(num_tokens: int, copy_gbs: float) -> dict:
    moved = 2 * 2 * num_tokens * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize  # K and V, read and written
    copies = max(1, min(32, math.ceil(L2_ROTATION_BYTES / moved)))
    num_blocks = math.ceil(2 * num_tokens / BLOCK_SIZE)
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(cache_shape, dtype=DTYPE, device="cuda")
    inputs = []
    for _ in range(copies):
        key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        value = torch.randn_like(key)
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:num_tokens]
        inputs.append((key, value, slots))

    ours_ms = graph_time_ms([lambda i=i: reshape_and_cache(*i[:2], k_cache, v_cache, i[2]) for i in inputs])
    ref_ms = time_cuda_ms(lambda: reference.reshape_and_cache(*inputs[0][:2], k_cache, v_cache, inputs[0][2]))
    gbs = moved / (ours_ms * 1e-3) / 1e9
    return {
        "tokens": num_tokens,
        "MB moved": moved / 1e6,
        "us": ours_ms * 1e3,
        "GB/s": gbs,
        "of copy": gbs / copy_gbs,
        "reference us": ref_ms * 1e3,
        "x reference": ref_ms / ours_ms,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    require_cuda()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + written)")
    print(f"(Hkv, D) = ({NUM_KV_HEADS}, {HEAD_DIM}), block {BLOCK_SIZE}, {DTYPE}")
    rows = [measure(n, copy_gbs) for n in TOKEN_COUNTS]
    print_table(rows, "KV-cache write (GB/s counts key and value bytes read plus cache bytes written)")
    write_json(args.json, {"gpu": gpu_name(), "copy_gbs": copy_gbs, "rows": rows})


if __name__ == "__main__":
    main()
