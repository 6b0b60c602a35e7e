"""The persistent decode kernel (ops.decode_layers, issue 17) against the per-layer path it replaces, on a random
model of Qwen3-0.6B's layer shapes (bf16, 28 layers, block size 16): ms per decode step from the embedding to the
final norm (no lm_head or sampler) for batch x context, each path captured in a CUDA graph, and the floor (the
layers' weights and the KV read once at the copy bandwidth measured in the same run). With --stages, where the
kernel's time goes, from its in-kernel timestamps: per stage (qkv, attention, o, gate_up, down) the mean over CTAs
and layers of the wait for the stage before, the x staging and the work, and of the work the part until the
stage's first slot was in shared memory (data), from its last slot to its signal (tail: the epilogue) and the
signal; per ring slot of each stage, how long before a consumer asked for it the producer issued it, how long the
consumer waited for its bytes and how long it took to use them; and the step's span per layer.

    python -m benchmarks.decode_layers [--batches 1 8] [--contexts 128 1024 4096 32768] [--stages] [--json PATH]
"""

import gc

import torch
from transformers import Qwen3Config

from benchmarks.common import copy_bandwidth_gbs, gpu_name, graph_time_ms, parser, print_table, require_cuda, write_json
from minivllm import ops
from minivllm.layers.attention import AttentionMetadata
from minivllm.models.decoder import DecoderForCausalLM

STAGES = ("qkv", "attention", "o", "gate_up", "down")
ROWS = [(1, 128), (1, 1024), (1, 4096), (1, 32768), (8, 1024)]
STAMPS = 7  # a stage's stamps (csrc/decode_layers.cu, kStamps)
SLOT_STAMPS = 4096  # ring slots a CTA stamps (kSlotStamps)
SLOT_FIELDS = 5  # a slot's stamps (kSlotFields): its stage, issued, asked, ready, done


def random_model(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, dtype: torch.dtype,
                 qk_norm: bool = True, seed: int = 0, max_position: int = 8192) -> DecoderForCausalLM:
    """A Qwen3 (or, without q/k norms, Llama) decoder of head_dim 128 on the GPU, random weights: norms about 1
    (random, so that a skipped norm shows), products scaled to keep activations near 1."""
    config = Qwen3Config(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=128, num_hidden_layers=layers, vocab_size=512, max_position_embeddings=max_position,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    with torch.device("cuda"):
        model = DecoderForCausalLM(config, "Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, device="cuda", generator=generator)
        param.data = (1 + 0.2 * values if name.endswith("norm.weight") else values / param.shape[-1] ** 0.5).to(dtype)
    return model


def random_step(model: DecoderForCausalLM, lens: list[int], block_size: int, dtype: torch.dtype, seed: int = 0):
    """Caches of random contents for every layer (one [2, layers, ...] tensor, as the runner allocates them),
    shuffled block tables, and a decode step's (ids, positions, metadata): row m decodes its token at position
    lens[m] - 1 (a len of 0 is a padding row: slot -1)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    layers = model.model.layers
    width = max(1, max((n + block_size - 1) // block_size for n in lens))
    num_blocks = len(lens) * width + 3
    shape = (2, len(layers), num_blocks, block_size, layers[0].self_attn.num_kv_heads, 128)
    kv_cache = torch.randn(shape, device="cuda", generator=generator).to(dtype)
    for i, layer in enumerate(layers):
        layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = kv_cache[0, i], kv_cache[1, i]
    tables = torch.randperm(num_blocks, device="cuda", generator=generator)[: len(lens) * width]
    tables = tables.view(len(lens), width).int()
    positions = torch.tensor([max(n - 1, 0) for n in lens], device="cuda")
    slots = [int(tables[m, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
             for m, n in enumerate(lens)]
    meta = AttentionMetadata(
        False, torch.tensor(slots, device="cuda"), context_lens=torch.tensor(lens, device="cuda", dtype=torch.int32),
        block_tables=tables, total_context_len=torch.tensor([sum(lens)], device="cuda"),
    )
    ids = torch.randint(0, 512, (len(lens),), device="cuda", generator=generator)
    return ids, positions, meta


def step_ms(model: DecoderForCausalLM, step: tuple, persistent: bool) -> float:
    mode, ops.DECODE_LAYERS = ops.DECODE_LAYERS, "1" if persistent else "0"
    try:
        assert model.model.runs_decode_layers(step[0], step[2]) is persistent
        return graph_time_ms([lambda: model(*step)])
    finally:
        ops.DECODE_LAYERS = mode


def run_stamped(model: DecoderForCausalLM, step: tuple, size: int) -> torch.Tensor:
    """The kernel's stamps (int64, ns) of its third call with a timings tensor of `size` entries."""
    flat = torch.zeros(size, dtype=torch.int64, device="cuda")
    for _ in range(3):
        flat.zero_()
        model.model.decode_layers(*step, timings=flat)
    torch.cuda.synchronize()
    return flat


def stage_times(model: DecoderForCausalLM, step: tuple) -> dict:
    """us per stage (mean over CTAs with an item and over layers 1..: wait, staging, work, and of the work until the
    first slot was in, after the last slot was done, and the signal) and per layer (span); then, from a second run
    that also stamps every ring slot (its own timer reads slow it), per slot of each stage (mean over its slots in
    layers 1..): lead (the producer issued it this long before a consumer asked for it), wait (the consumer waited
    this long for its bytes), fetch (issued to in, over the slots waited for) and use (in to done)."""
    layers = len(model.model.layers)
    grid = torch.cuda.get_device_properties(0).multi_processor_count
    stage_part = grid * layers * len(STAGES) * STAMPS
    t = run_stamped(model, step, stage_part).view(grid, layers, len(STAGES), STAMPS)
    t = t[:, 1:].double() / 1e3  # us; layer 0 starts unevenly (CTAs launch over a few us)
    present = t[..., 0] > 0
    out = {}
    for i, name in enumerate(STAGES):
        rows = t[:, :, i][present[:, :, i]]
        for part, (a, b) in (("wait", (0, 1)), ("stage", (1, 2)), ("work", (2, 3)), ("data", (2, 4)),
                             ("tail", (5, 6)), ("signal", (6, 3))):
            fed = rows[rows[:, max(a, b)] > 0]  # (a CTA whose items had no slot stamps no [4], [5])
            out[f"{name}_{part}_us"] = (fed[:, b] - fed[:, a]).mean().item()
    done = torch.where(present[:, :, -1], t[:, :, -1, 3], torch.zeros_like(t[:, :, -1, 3])).amax(0)
    out["us_per_layer"] = (done[-1] - done[0]).item() / (len(done) - 1)
    slots = run_stamped(model, step, stage_part + grid * SLOT_STAMPS * SLOT_FIELDS)[stage_part:].view(-1, SLOT_FIELDS)
    slots = slots[(slots[:, 4] > 0) & (slots[:, 0] >= len(STAGES))]  # stamped, layers 1..
    tag, (issued, asked, ready, used) = slots[:, 0], (slots[:, k].double() / 1e3 for k in range(1, SLOT_FIELDS))
    for i, name in enumerate(STAGES):
        mine = tag % len(STAGES) == i
        waited = mine & (ready - asked > 0)
        out[f"{name}_slots"] = mine.sum().item() / grid / (layers - 1)
        out[f"{name}_lead_us"] = (asked - issued)[mine].mean().item()
        out[f"{name}_slot_wait_us"] = (ready - asked)[mine].mean().item()
        out[f"{name}_fetch_us"] = (ready - issued)[waited].mean().item() if waited.any() else 0.0
        out[f"{name}_use_us"] = (used - ready)[mine].mean().item()
    times = torch.unique(slots[:, 1:].flatten())
    out["timer_step_ns"] = (times[1:] - times[:-1]).min().item() if len(times) > 1 else 0
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batches", type=int, nargs="+", help="keep only the rows of these batches")
    p.add_argument("--contexts", type=int, nargs="+", help="keep only the rows of these contexts")
    p.add_argument("--stages", action="store_true", help="also the kernel's time by stage")
    args = p.parse_args()
    require_cuda()
    bandwidth = copy_bandwidth_gbs()
    model = random_model(1024, 3072, 16, 8, 28, torch.bfloat16, max_position=max(c for _, c in ROWS) + 1)
    weight_bytes = sum(
        param.numel() * param.element_size() for name, param in model.named_parameters() if ".layers." in name
    )
    rows, stages = [], []
    for batch, context in ROWS:
        if (args.batches and batch not in args.batches) or (args.contexts and context not in args.contexts):
            continue
        step = random_step(model, [context] * batch, 16, torch.bfloat16)
        _, kv_cache = model.model.decode_layers_inputs()  # [2, layers, blocks, block_size, kv_heads, D]
        kv_bytes = batch * context * kv_cache[:, :, 0, 0].numel() * kv_cache.element_size()
        floor = (weight_bytes + kv_bytes) / (bandwidth * 1e9) * 1e3
        persistent, per_layer = step_ms(model, step, True), step_ms(model, step, False)
        rows.append({"batch": batch, "context": context, "persistent_ms": persistent, "per_layer_ms": per_layer,
                     "speedup": per_layer / persistent, "floor_ms": floor, "of_floor": floor / persistent})
        if args.stages:
            stages.append({"batch": batch, "context": context, **stage_times(model, step)})
        del step
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU {gpu_name()}, copy bandwidth {bandwidth:.0f} GB/s, layers' weights {weight_bytes / 1e9:.3f} GB")
    print_table(rows, "a decode step's layers (embedding to final norm), ms: persistent kernel and per-layer path")
    if stages:
        for name in STAGES:
            print_table([{"batch": r["batch"], "context": r["context"],
                          **{k: v for k, v in r.items() if k.startswith(name + "_")}} for r in stages],
                        f"stage {name}: us a CTA (wait for the stage before, x staging, work; of the work, data: "
                        "until its first slot was in, tail: from its last slot done to the signal, signal), then "
                        "per ring slot from a second run (slots a CTA and layer; lead: issued before asked for; "
                        "slot_wait: asked to in; fetch: issued to in where waited; use: in to done), layers 1..27")
        print_table([{"batch": r["batch"], "context": r["context"], "us_per_layer": r["us_per_layer"],
                      "timer_step_ns": r["timer_step_ns"]} for r in stages],
                    "span a layer (last CTA done, layer to layer); the global timer's smallest step seen")
    write_json(args.json, {"gpu": gpu_name(), "copy_gbs": bandwidth, "rows": rows, "stages": stages})


if __name__ == "__main__":
    main()
