"""Piecewise CUDA graphs of the prefill, as vLLM runs its prefills: the model between two attentions is one graph,
and attention runs eagerly in between, from the step's own sequence lengths.

Why: an eager prefill step launches about ten kernels a layer from Python, each product through cuBLAS's host
path (about 25 us), and up to about 4k tokens that host time is the longer: on an H200 a 128-token prompt's first
token took 8.7..14.3 ms eagerly (the host's pace varies between processes), and 4 ms with these graphs. A 4k
prompt's kernels take about 11.6 ms. A replay launches a piece's kernels at once.

How: everything between two attentions computes each token's row on its own (norms, products, q/k norm and rotary,
the K/V cache write), so a piece captured for N tokens runs any step of up to N tokens, padded. Padding tokens are
token 0 at position 0 writing no cache slot (StepInputs stages them so), and their rows are never read: attention
covers the step's own tokens, and sampling and prompt logprobs read real rows only. The pieces read the step's
inputs at the addresses StepInputs gives a prefill of N tokens, write each layer's qkv into one buffer, and read
attention's output from another; attention writes there (flash_attn_varlen's out).

Buckets: steps of more than SMALL_M_MAX_ROWS tokens (fewer run the fused small-M layers, eagerly as before) and up
to the largest bucket; longer steps are GPU-bound, and run eagerly.
"""

import time

import torch

from minivllm.engine.step_inputs import StepInputs
from minivllm.layers.attention import AttentionMetadata
from minivllm.models import DecoderForCausalLM
from minivllm.ops import SMALL_M_MAX_ROWS

# token counts a graph is captured for; a step pads to the next one (at most a third more tokens above 1k, where
# the padding's GPU time starts to count)
BUCKETS = (32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)


class PrefillGraphs:
    def __init__(self, model: DecoderForCausalLM, max_tokens: int):
        """Buckets up to max_tokens (a step's token budget), on model's device; capture() fills them."""
        self.model = model.model
        self.buckets = [b for b in BUCKETS if b <= max_tokens and b > SMALL_M_MAX_ROWS]
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # per bucket: the pieces, in order
        self.hidden: dict[int, torch.Tensor] = {}  # per bucket: the last piece's output, the hidden states
        self.capture_seconds = 0.0
        # every layer's qkv, and attention's output, for the largest bucket; the others use their first rows
        attn = self.model.layers[0].self_attn
        weight, largest = attn.qkv_proj.weight, max(self.buckets, default=0)
        self.qkv = torch.empty(largest, weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.attn_out = torch.zeros(largest, attn.num_heads, attn.head_dim, dtype=weight.dtype, device=weight.device)

    def bucket(self, num_tokens: int) -> int | None:
        """The bucket a prefill step of num_tokens replays, or None to run it eagerly."""
        if num_tokens <= SMALL_M_MAX_ROWS:
            return None
        return next((b for b in self.buckets if b >= num_tokens), None)

    @torch.inference_mode()
    def capture(self, inputs: StepInputs, pool: tuple | None) -> None:
        """Capture every bucket's pieces, largest first, into pool (shared with the decode graphs: one step runs
        at a time). Each bucket's pieces run once eagerly first (cuBLAS picks and sets up its kernels outside the
        graph). torch.cuda.graph() is not used: it collects garbage and empties the cache at every graph, seconds
        over the few hundred pieces."""
        if not self.buckets:
            return
        start = time.perf_counter()
        device = self.qkv.device
        stream = torch.cuda.Stream(device)
        for b in reversed(self.buckets):
            input_ids, positions, slot_mapping = inputs.prefill_views(b)
            meta = AttentionMetadata(True, slot_mapping)  # the pieces read the slots only
            residual = None
            for index in range(len(self.model.layers) + 1):  # the warm-up
                _, residual = self.piece(index, input_ids, positions, meta, b, residual)
            torch.cuda.synchronize(device)
            self.graphs[b] = []
            with torch.cuda.stream(stream):
                for index in range(len(self.model.layers) + 1):
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool)
                    out, residual = self.piece(index, input_ids, positions, meta, b, residual if index else None)
                    graph.capture_end()
                    pool = graph.pool()
                    self.graphs[b].append(graph)
            self.hidden[b] = out
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start

    def piece(self, index: int, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, b: int,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = input_ids if index == 0 else self.attn_out[:b].flatten(1, 2)
        return self.model.piece(index, positions, meta, x, residual, self.qkv[:b])

    @property
    def all_graphs(self) -> list[torch.cuda.CUDAGraph]:
        return [graph for pieces in self.graphs.values() for graph in pieces]

    def run(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        """Replay bucket b over the step staged for it (StepInputs.stage with graph_tokens=b), attention eagerly
        between the pieces: the hidden states [b, hidden], rows past the step's tokens meaningless."""
        qkv, attn_out = self.qkv[:b], self.attn_out[:b]
        for index, graph in enumerate(self.graphs[b]):
            if index > 0:  # attention of the layer the piece before projected
                self.model.layers[index - 1].self_attn.attention(qkv, meta, out=attn_out)
            graph.replay()
        return self.hidden[b]
