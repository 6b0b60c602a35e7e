"""Runs the model on one step's batch: builds input tensors and attention metadata, runs the forward
(eager, or a CUDA graph replay for decode), and samples. Also owns the KV cache and sizes it."""

import time
from dataclasses import dataclass

import numpy as np
import torch

from minivllm import ops
from minivllm.config import EngineConfig
from minivllm.distributed import TensorParallel
from minivllm.engine.graph_inputs import GraphInputs, copy_pending_tokens
from minivllm.engine.scheduler import ScheduledBatch
from minivllm.engine.sequence import Sequence
from minivllm.host_copy import to_device
from minivllm.layers.attention import Attention, AttentionMetadata
from minivllm.layers.sampler import SamplingBatch, sample
from minivllm.model_loader import ModelSource, init_random_weights, load_weights
from minivllm.models import DecoderForCausalLM, model_architecture
from minivllm.models.decoder import head_dim_of

CPU_KV_CACHE_BYTES = 2 << 30  # the CPU has no memory to profile against; a fixed budget keeps runs predictable


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, dtype: torch.dtype, tp: TensorParallel | None = None):
        self.config = config
        self.device = config.device
        self.dtype = dtype
        self.block_size = config.block_size
        # this rank's place when the model is split over several GPUs
        self.tp = tp or TensorParallel(invariant_splits=config.tp_invariant)
        self.model = build_model(source, dtype, self.device, config.seed, self.tp)
        # unseeded requests draw from this, so an engine's sampling reproduces for a given LLM(seed=), as in vLLM
        self.sampling_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.tp.reached("weights loaded")
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.max_model_len = min(
            config.max_model_len or source.config.max_position_embeddings, source.config.max_position_embeddings
        )
        self.num_kv_blocks = self.allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_capture_seconds = 0.0
        if self.device.type == "cuda" and not config.enforce_eager and ops.use_kernels(self.kv_cache):
            self.capture_decode_graphs()
        if self.device.type == "cuda":
            self.warm_up_sampler()

    # ----- KV cache -------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.block_size

    def allocate_kv_cache(self) -> int:
        """Size the cache (num_kv_blocks, else GPU memory left after a profiling forward, else the CPU budget)."""
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = self.profile_free_blocks()
        else:
            wanted = self.config.max_num_seqs * self.max_model_len * self.kv_bytes_per_block() // self.block_size
            num_blocks = min(CPU_KV_CACHE_BYTES, wanted) // self.kv_bytes_per_block()
        num_blocks = self.tp.min_over_ranks(num_blocks)  # one block table serves every rank's cache
        if num_blocks < 1:
            raise ValueError(
                "no GPU memory is left for the KV cache after the weights and activations; raise "
                "gpu_memory_utilization, lower max_num_batched_tokens, or pass num_kv_blocks"
            )
        layer = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def profile_free_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the GPU after a forward at the full token budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.config.max_num_batched_tokens
        seq_len = min(num_tokens, self.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(True, torch.full((num_tokens,), -1, device=self.device), cu, cu, seq_len, seq_len)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, meta)
            rows = min(num_tokens, self.config.max_num_seqs)  # the most rows a step samples
            logits = self.model.compute_logits(hidden[:rows])
            if logits is not None:  # rank 0 alone samples: fp32 logits, and as much exponential noise
                torch.empty_like(logits, dtype=torch.float32)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(self.device)
        used_elsewhere = total - free - torch.cuda.memory_allocated(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = total * self.config.gpu_memory_utilization - used_elsewhere - peak
        return int(budget) // self.kv_bytes_per_block()

    # ----- inputs ---------------------------------------------------------------------------------------
    def to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        positions = np.arange(start, end)
        table = np.asarray(seq.block_table, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def block_table_array(self, seqs: list[Sequence]) -> np.ndarray:
        """Each sequence's block ids in a row, zero-padded (past a sequence's end nothing is read)."""
        width = max(len(seq.block_table) for seq in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = seq.block_table
        return tables

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids, positions, slots, q_lens, k_lens = [], [], [], [], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.append(np.arange(start, end))
            slots.append(self.slots(seq, start, end))
            q_lens.append(end - start)
            k_lens.append(end)
        has_cached_keys = any(seq.num_computed_tokens > 0 for seq in seqs)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self.to_device(np.concatenate(slots), torch.int64),
            cu_seqlens_q=self.to_device(np.cumsum([0, *q_lens]), torch.int32),
            cu_seqlens_k=self.to_device(np.cumsum([0, *k_lens]), torch.int32),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
            block_tables=self.to_device(self.block_table_array(seqs), torch.int32) if has_cached_keys else None,
        )
        return self.to_device(input_ids, torch.int64), self.to_device(np.concatenate(positions), torch.int64), meta

    def prepare_decode(
        self, seqs: list[Sequence], previous: "LaunchedStep | None"
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        lengths = [len(seq) for seq in seqs]  # counting a token still on the GPU
        bs = self.block_size
        slots = [seq.block_table[(n - 1) // bs] * bs + (n - 1) % bs for seq, n in zip(seqs, lengths)]
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.to_device(slots, torch.int64),
            context_lens=self.to_device(lengths, torch.int32),
            block_tables=self.to_device(self.block_table_array(seqs), torch.int32),
            total_context_len=self.to_device([sum(lengths)], torch.int64),
        )
        input_ids = self.to_device([0 if seq.num_pending_tokens else seq.token_ids[-1] for seq in seqs], torch.int64)
        copy_pending_tokens(input_ids, seqs, *previous_step(previous))
        return input_ids, self.to_device([n - 1 for n in lengths], torch.int64), meta

    # ----- running --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, eos_ids: list[int], previous: "LaunchedStep | None") -> "LaunchedStep":
        """Start the step on the device, without waiting for it: the next token of each sequence whose
        scheduled tokens reach its end. Tokens that `previous` sampled and the host has not seen yet are
        read where they are, in previous.tokens."""
        self.tp.send_step(batch)
        sampling_seqs = [seq for seq in batch.seqs if seq.samples_this_step]
        if batch.is_prefill:
            input_ids, positions, meta = self.prepare_prefill(batch.seqs)
            if not sampling_seqs:
                self.model(input_ids, positions, meta)
                return LaunchedStep.nothing()
            last = np.cumsum([seq.num_scheduled_tokens for seq in batch.seqs]) - 1
            rows = [i for i, seq in zip(last, batch.seqs) if seq.samples_this_step]
            hidden = self.model(input_ids, positions, meta)[self.to_device(rows, torch.int64)]
        else:
            hidden = self.decode(batch.seqs, previous)
        logits = self.model.compute_logits(hidden)
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 samples, and sends the tokens
            tokens = torch.empty(len(sampling_seqs), dtype=torch.int64, device=self.device)
        else:
            sampling = SamplingBatch.from_sequences(sampling_seqs, eos_ids, self.device, self.sampling_generator)
            tokens = sample(logits, sampling)
        self.tp.broadcast_from_first_rank(tokens)  # every rank's next step may read them (async scheduling)
        if self.device.type != "cuda":
            return LaunchedStep(sampling_seqs, tokens, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(sampling_seqs, tokens, host, done)

    def decode(self, seqs: list[Sequence], previous: "LaunchedStep | None") -> torch.Tensor:
        batch_size = len(seqs)
        graph_size = next((size for size in sorted(self.graphs) if size >= batch_size), None)
        if graph_size is None:
            return self.model(*self.prepare_decode(seqs, previous))
        self.graph_inputs.fill(seqs, graph_size, *previous_step(previous))
        self.graphs[graph_size].replay()
        return self.graph_hidden[:batch_size]

    @torch.inference_mode()
    def warm_up_sampler(self) -> None:
        """Compile the sampler's fused kernel now, rather than in the first steps that sample with a
        temperature: torch.compile specialises a batch of one row, so one row and two rows compile the two
        graphs that every later batch reuses. A generator of its own leaves the engine's draws untouched."""
        generator = torch.Generator(self.device)
        hidden = torch.zeros(2, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        for rows in (1, 2):
            logits = self.model.compute_logits(hidden[:rows])  # every rank: the lm_head gathers across them
            if logits is not None:
                temperatures = torch.ones(rows, dtype=torch.float32, device=self.device)
                batch = SamplingBatch(temperatures, top_k=None, top_p=None, min_p=None, seeded_rows=[], banned=[],
                                      all_greedy=False, any_greedy=False, generator=generator)
                sample(logits, batch)

    # ----- CUDA graphs ----------------------------------------------------------------------------------
    def graph_batch_sizes(self) -> list[int]:
        largest = min(self.config.max_num_seqs, 512)
        return [s for s in (1, 2, 4, 8) if s < largest] + list(range(16, largest, 16)) + [largest]

    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        """One graph per batch-size bucket, largest first, all in one memory pool; inputs padded at replay."""
        start = time.perf_counter()
        sizes = self.graph_batch_sizes()
        largest, max_blocks = sizes[-1], -(-self.max_model_len // self.block_size)
        self.graph_inputs = GraphInputs(largest, max_blocks, self.block_size, self.device)
        hidden = torch.zeros(largest, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        pool = None
        for size in reversed(sizes):
            args = self.graph_inputs.views(size)
            hidden[:size] = self.model(*args)  # warm-up outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                hidden[:size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
            torch.cuda.synchronize()
        self.graph_hidden = hidden
        self.graph_capture_seconds = time.perf_counter() - start


def release_graphs(graphs: dict[int, torch.cuda.CUDAGraph]) -> None:
    """Destroy captured graphs. NCCL cannot destroy (or abort) a communicator while a graph that captured one
    of its collectives lives, so tensor parallelism calls this on every rank before leaving its group."""
    for graph in graphs.values():
        graph.reset()
    graphs.clear()


def previous_step(previous: "LaunchedStep | None") -> tuple[torch.Tensor | None, list[Sequence]]:
    """The tokens and sequences of the step before, whose tokens a decode step may read."""
    return (previous.tokens, previous.seqs) if previous is not None else (None, [])


@dataclass
class LaunchedStep:
    """A launched step's sampled tokens: on the device at once, readable on the host once the step is done."""

    seqs: list[Sequence]  # the sequences that sampled, in row order
    tokens: torch.Tensor  # [len(seqs)] int64 on the device
    host_tokens: torch.Tensor  # their copy in pinned memory (on the CPU: the same tensor)
    done: torch.cuda.Event | None = None  # recorded after that copy

    @classmethod
    def nothing(cls) -> "LaunchedStep":
        empty = torch.empty(0, dtype=torch.int64)
        return cls([], empty, empty)

    def token_ids(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host_tokens.tolist()


def build_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int, tp: TensorParallel | None = None
) -> DecoderForCausalLM:
    arch = model_architecture(source.config)
    head_dim = head_dim_of(source.config)
    if source.config.num_attention_heads % source.config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {source.config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {source.config.num_key_value_heads}"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DecoderForCausalLM(source.config, arch, tp)
    finally:
        torch.set_default_dtype(default_dtype)
    if source.weights_dir is None:
        init_random_weights(model, seed)
    else:
        load_weights(model, source.weights_dir)
    return model.eval()
