"""Small-M linear (decode's weight matrix products): our kernel against torch (cuBLAS: F.linear, or torch.mm
with fp32 output for the lm_head) on Qwen3-0.6B's shapes, bf16, and the GPU's own copy bandwidth measured in
the same run. A decode step reads every weight once, so GB/s counts the weight bytes read per call.

Both are timed as CUDA-graph replays of back-to-back calls, each on its own copy of the weights, so that the
copies together exceed the L2 (as a step's 1.2 GB of weights do) and no call reads its weights from L2.

Then the fused products (issue 17) against the unfused kernels they replace, as the decoder ran them before: the
RMSNorm (torch.compile'd) and our product for qkv; the product and the residual add (compiled) for o and down;
the norm, cuBLAS's gate_up and the compiled SiLU-and-mul; and a layer's products in all, with both norms.

    python -m benchmarks.small_m_linear [--json PATH]
"""

import math

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth_gbs, gpu_name, graph_time_ms, parser, print_table, require_cuda, write_json
from benchmarks.decode import L2_ROTATION_BYTES
from minivllm import ops
from minivllm.layers.fusion import fused_on_gpu
from minivllm.ops import KERNELS_BUILT, SMALL_M_MAX_ROWS

DTYPE = torch.bfloat16
NUM_LAYERS = 28  # Qwen3-0.6B
# name, N, K, fp32 output; per layer except the lm_head
SHAPES = [
    ("qkv", 4096, 1024, False),
    ("o", 1024, 2048, False),
    ("gate_up", 6144, 1024, False),
    ("down", 1024, 3072, False),
    ("lm_head", 151936, 1024, True),
]
ROWS = [m for m in (1, 2, 4, 8, 16) if m <= SMALL_M_MAX_ROWS]
TORCH_ONLY_ROWS = [32, 64, 128, 256]  # batches the engine leaves to cuBLAS: what they cost a step
COLUMNS = ["layer", "N x K", "M", "us", "GB/s", "of copy", "torch us", "torch GB/s", "torch of copy", "x torch"]
STEP_COLUMNS = ["M", "us", "torch us", "saved us", "x torch"]
HIDDEN, QKV, INTERMEDIATE, EPS = 1024, 4096, 3072, 1e-6  # Qwen3-0.6B
FUSED_ROWS = [1, 8]
FUSED_COLUMNS = ["fusion", "M", "fused us", "unfused us", "saved us", "x unfused"]


def torch_linear(x: torch.Tensor, weight: torch.Tensor, fp32_out: bool) -> torch.Tensor:
    """What the engine ran before: cuBLAS, fp32 logits straight out of the GEMM for the lm_head."""
    return torch.mm(x, weight.t(), out_dtype=torch.float32) if fp32_out else F.linear(x, weight)


def measure(name: str, n: int, k: int, fp32_out: bool, m: int, weights: list[torch.Tensor], copy_gbs: float) -> dict:
    x = torch.randn(m, k, dtype=DTYPE, device="cuda")
    torch_ms = graph_time_ms([lambda w=w: torch_linear(x, w, fp32_out) for w in weights])
    weight_bytes = n * k * DTYPE.itemsize
    torch_gbs = weight_bytes / (torch_ms * 1e-3) / 1e9
    row = {"layer": name, "N x K": f"{n}x{k}", "M": m,
           "torch us": torch_ms * 1e3, "torch GB/s": torch_gbs, "torch of copy": torch_gbs / copy_gbs}
    if m > SMALL_M_MAX_ROWS:
        return row
    ours_ms = graph_time_ms([lambda w=w: torch.ops.minivllm.small_m_linear(x, w, None, fp32_out) for w in weights])
    gbs = weight_bytes / (ours_ms * 1e-3) / 1e9
    return row | {"us": ours_ms * 1e3, "GB/s": gbs, "of copy": gbs / copy_gbs, "x torch": torch_ms / ours_ms}


def per_step(rows: list[dict]) -> list[dict]:
    """The rows summed as one decode step of the model runs them: each layer's four products, and the lm_head."""
    totals = []
    for m in ROWS + TORCH_ONLY_ROWS:
        ours = torch_us = 0.0
        for row in (r for r in rows if r["M"] == m):
            times = NUM_LAYERS if row["layer"] != "lm_head" else 1
            ours += times * (row["us"] or 0.0)
            torch_us += times * row["torch us"]
        total = {"M": m, "torch us": torch_us}
        totals.append(total | ({"us": ours, "saved us": torch_us - ours, "x torch": torch_us / ours} if ours else {}))
    return totals


@fused_on_gpu
def add_to_residual(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return residual + x.float()


def layer_weights() -> dict[str, torch.Tensor]:
    def matrix(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, dtype=DTYPE, device="cuda") * k**-0.5

    def norm() -> torch.Tensor:
        return torch.rand(HIDDEN, dtype=DTYPE, device="cuda") + 0.5

    return {"qkv": matrix(QKV, HIDDEN), "o": matrix(HIDDEN, 2048), "gate_up": matrix(2 * INTERMEDIATE, HIDDEN),
            "down": matrix(HIDDEN, INTERMEDIATE), "norm1": norm(), "norm2": norm()}


def fused_pairs(w: dict, residual: torch.Tensor, acts: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """fusion -> (fused call, the unfused calls it replaces) on one copy of a layer's weights; residual is the fp32
    stream; acts the attention output "attn", the MLP's SiLU output "h" and the layer before's output "prev"."""
    linear, attn, h = ops.linear, acts["attn"], acts["h"]
    return {
        "rms_norm + qkv": (lambda: ops.norm_linear(residual, w["norm1"], EPS, w["qkv"]),
                           lambda: linear(ops.rms_norm(residual, w["norm1"], EPS), w["qkv"])),
        "o + residual add": (lambda: ops.linear_add_residual(attn, w["o"], residual),
                             lambda: add_to_residual(linear(attn, w["o"]), residual)),
        "rms_norm + gate_up + silu": (
            lambda: ops.norm_gate_up_silu(residual, w["norm2"], EPS, w["gate_up"]),
            lambda: ops.silu_and_mul(linear(ops.rms_norm(residual, w["norm2"], EPS), w["gate_up"]))),
        "down + residual add": (lambda: ops.linear_add_residual(h, w["down"], residual),
                                lambda: add_to_residual(linear(h, w["down"]), residual)),
        "layer's products": (lambda: fused_layer(w, residual, attn),
                             lambda: unfused_layer(w, residual, attn, acts["prev"])),
    }


def fused_layer(w: dict, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """A layer's four fused products as DecoderLayer.fused_forward runs them (attention's output given)."""
    ops.norm_linear(residual, w["norm1"], EPS, w["qkv"])
    residual = ops.linear_add_residual(attn, w["o"], residual)
    h = ops.norm_gate_up_silu(residual, w["norm2"], EPS, w["gate_up"])
    return ops.linear_add_residual(h, w["down"], residual)


def unfused_layer(w: dict, residual: torch.Tensor, attn: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The same as DecoderLayer.forward ran it: add + norm, qkv, o, add + norm, gate_up, SiLU-and-mul, down."""
    normed, residual = ops.add_rms_norm(prev, residual, w["norm1"], EPS)
    ops.linear(normed, w["qkv"])
    normed, residual = ops.add_rms_norm(ops.linear(attn, w["o"]), residual, w["norm2"], EPS)
    return ops.linear(ops.silu_and_mul(ops.linear(normed, w["gate_up"])), w["down"])


def measure_fusions() -> list[dict]:
    """Each fusion against its unfused kernels, graph-timed over copies of the layer's weights beyond the L2."""
    layer_bytes = (QKV * HIDDEN + HIDDEN * 2048 + 2 * INTERMEDIATE * HIDDEN + HIDDEN * INTERMEDIATE) * DTYPE.itemsize
    copies = [layer_weights() for _ in range(max(1, math.ceil(L2_ROTATION_BYTES / layer_bytes)))]
    rows = []
    for m in FUSED_ROWS:
        residual = torch.randn(m, HIDDEN, device="cuda")
        acts = {name: torch.randn(m, k, dtype=DTYPE, device="cuda")
                for name, k in (("attn", 2048), ("h", INTERMEDIATE), ("prev", HIDDEN))}
        pairs = [fused_pairs(w, residual, acts) for w in copies]
        for name in pairs[0]:
            fused_ms = graph_time_ms([p[name][0] for p in pairs])
            unfused_ms = graph_time_ms([p[name][1] for p in pairs])
            rows.append({"fusion": name, "M": m, "fused us": fused_ms * 1e3, "unfused us": unfused_ms * 1e3,
                         "saved us": (unfused_ms - fused_ms) * 1e3, "x unfused": unfused_ms / fused_ms})
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    require_cuda()
    if not KERNELS_BUILT:
        raise SystemExit("the CUDA extension minivllm._C is not built (scripts/gpu_build.sh)")
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + written)")
    print(f"Qwen3-0.6B shapes, {DTYPE}; 'of copy' = weight bytes read per second / copy bandwidth")
    rows = []
    for name, n, k, fp32_out in SHAPES:
        weight_bytes = n * k * DTYPE.itemsize
        copies = max(1, min(64, math.ceil(L2_ROTATION_BYTES / weight_bytes)))
        weights = [torch.randn(n, k, dtype=DTYPE, device="cuda") * k**-0.5 for _ in range(copies)]
        rows += [measure(name, n, k, fp32_out, m, weights, copy_gbs) for m in ROWS + TORCH_ONLY_ROWS]
        del weights
    rows = [{c: row.get(c) for c in COLUMNS} for row in rows]
    print_table(rows, "Per call (weights rotated through copies that together exceed the L2)")
    totals = [{c: total.get(c) for c in STEP_COLUMNS} for total in per_step(rows)]
    print_table(totals, f"Summed per decode step: {NUM_LAYERS} layers x (qkv, o, gate_up, down) + lm_head")
    fusions = measure_fusions()
    print_table(fusions, f"Fused products against the unfused kernels they replace (a layer's x {NUM_LAYERS} a step)")
    write_json(args.json, {"gpu": gpu_name(), "copy_gbs": copy_gbs, "rows": rows, "per_step": totals,
                           "fusions": fusions})


if __name__ == "__main__":
    main()
