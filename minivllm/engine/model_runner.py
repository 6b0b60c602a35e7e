"""Runs the model, one StepMessage at a time: stages its inputs, runs the forward (eager, or CUDA graph replays:
a whole decode step, a prefill's pieces between its attentions) and samples. Also owns the KV cache and measures
how much of it fits.

The runner knows nothing of requests or of the other ranks beyond its shard of the model: the layer above
(the engine, or the tensor-parallel worker loop) sizes the cache across ranks and hands it every step.
"""

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from minivllm import ops
from minivllm.config import EngineConfig
from minivllm.distributed import TensorParallel
from minivllm.engine.prefill_graphs import PrefillGraphs
from minivllm.engine.step_inputs import StepInputs
from minivllm.engine.step_message import StepMessage
from minivllm.layers.attention import Attention, AttentionMetadata
from minivllm.layers.penalties import Penalties, PenaltyCounts
from minivllm.layers.sampler import SamplerOutput, SamplingBatch, logprobs_of, sample
from minivllm.model_loader import ModelSource, init_random_weights, load_weights
from minivllm.models import DecoderForCausalLM, model_architecture
from minivllm.models.decoder import head_dim_of

PROMPT_LOGITS_ROWS = 512  # prompt logprobs' logits are made this many tokens at a time (fp32 [rows, vocab])
CPU_KV_CACHE_SHARE = 0.25  # of the memory available at start-up: the CPU's KV cache (num_kv_blocks overrides it)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallel | None = None):
        self.config = config
        self.device = config.device if tp is None or tp.rank == 0 else rank_device(config.device, tp.rank)
        self.dtype = config.dtype
        self.block_size = config.args.block_size
        self.tp = tp or TensorParallel(invariant_splits=config.args.tp_invariant)
        self.model = build_model(config.source, self.dtype, self.device, config.args.seed, self.tp)
        # unseeded requests draw from this, so an engine's sampling reproduces for a given LLM(seed=), as in vLLM
        self.sampling_generator = torch.Generator(self.device).manual_seed(config.args.seed)
        self.penalty_counts = PenaltyCounts(config.source.config.vocab_size, config.args.max_num_seqs, self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode, by padded batch size
        self.prefill_graphs: PrefillGraphs | None = None
        self.captured_graphs: list[torch.cuda.CUDAGraph] = []  # all of them, for release_graphs
        self.graph_capture_seconds = 0.0
        self.graph_memory_bytes = 0  # the graphs' memory pool and static buffers
        self.num_kv_blocks = 0
        self.previous_tokens: torch.Tensor | None = None  # what the last step sampled, which the next may read

    # ----- KV cache -------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.block_size

    def available_kv_blocks(self) -> int:
        """How many blocks this rank can hold: num_kv_blocks if given, else what fits in the GPU memory left after
        a profiling forward, else a share of the CPU's available memory (with room for at least one max_model_len
        sequence, and no more than max_num_seqs of them need)."""
        args = self.config.args
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        if self.device.type == "cuda":
            return self.profile_free_blocks()
        max_len = self.config.max_model_len
        wanted = args.max_num_seqs * max_len * self.kv_bytes_per_block() // self.block_size
        one_sequence = -(-max_len // self.block_size) * self.kv_bytes_per_block()
        budget = int(CPU_KV_CACHE_SHARE * available_memory_bytes()) // self.tp.size  # the ranks share the machine
        return min(max(budget, one_sequence), wanted) // self.kv_bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate num_blocks blocks (the same on every rank: one block table serves all), then capture the decode
        graphs and compile the sampler, which both need the cache."""
        self.num_kv_blocks = num_blocks
        layer = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        args = self.config.args
        max_blocks = -(-self.config.max_model_len // self.block_size)
        max_rows = args.max_num_seqs
        self.inputs = StepInputs(max(args.max_num_batched_tokens, max_rows), max_rows, max_blocks, self.block_size,
                                 self.device)
        if self.device.type == "cuda" and not args.enforce_eager and ops.use_kernels(self.kv_cache):
            pool = self.capture_decode_graphs()
            self.prefill_graphs = PrefillGraphs(self.model, args.max_num_batched_tokens)
            self.prefill_graphs.capture(self.inputs, pool)
            self.captured_graphs += self.prefill_graphs.all_graphs
            self.graph_capture_seconds += self.prefill_graphs.capture_seconds
            buffers = (self.graph_hidden, self.prefill_graphs.qkv, self.prefill_graphs.attn_out)
            self.graph_memory_bytes = pool_bytes(pool) + sum(t.nbytes for t in buffers)
        if self.device.type == "cuda":
            self.warm_up_sampler()

    def profile_free_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the GPU after a forward at the full token budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        args = self.config.args
        num_tokens = args.max_num_batched_tokens
        seq_len = min(num_tokens, self.config.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(True, torch.full((num_tokens,), -1, device=self.device), cu, cu, seq_len, seq_len)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, meta)
            rows = min(num_tokens, args.max_num_seqs)  # the most rows a step samples
            logits = self.model.compute_logits(hidden[:rows])
            if logits is not None:  # rank 0 alone samples: fp32 logits, and as much exponential noise
                torch.empty_like(logits, dtype=torch.float32)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(self.device)
        used_elsewhere = total - free - torch.cuda.memory_allocated(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = total * args.gpu_memory_utilization - used_elsewhere - peak
        return int(budget) // self.kv_bytes_per_block()

    # ----- running --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepMessage) -> "LaunchedStep":
        """Start the step on the device, without waiting for it: the next token of each sampling row."""
        graph_size = None if step.is_prefill else next((s for s in sorted(self.graphs) if s >= step.num_rows), None)
        bucket = self.prefill_graphs.bucket(step.num_tokens) if step.is_prefill and self.prefill_graphs else None
        staged = self.inputs.stage(step, graph_size or step.num_rows, self.previous_tokens, self.sampling_generator,
                                   self.penalty_counts, for_graph=graph_size is not None, graph_tokens=bucket)
        prompt_logprobs = None
        if graph_size is not None:
            self.graphs[graph_size].replay()
            hidden = self.graph_hidden[: step.num_rows]
        else:  # a prefill's pieces replay where a bucket holds it (rows past its tokens are padding)
            hidden = (self.prefill_graphs.run(bucket, staged.meta) if bucket is not None
                      else self.model(staged.input_ids, staged.positions, staged.meta))
            prompt_logprobs = self.prompt_logprobs(step, hidden) if step.prompt_logprobs else None
            if not step.sampling_rows:  # prompt chunks that do not reach their prompt's end
                self.previous_tokens = None
                return LaunchedStep.copy_to_host(torch.empty(0, dtype=torch.int64), None, prompt_logprobs)
            if staged.sample_rows is not None:
                hidden = hidden[staged.sample_rows]
        logits = self.model.compute_logits(hidden)
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 samples, and sends the tokens
            out = SamplerOutput(torch.empty(len(step.sampling_rows), dtype=torch.int64, device=self.device))
        else:
            out = sample(logits, staged.sampling)
            if staged.sampling.penalties is not None:
                staged.sampling.penalties.count_sampled(out.tokens)
        self.tp.broadcast_from_first_rank(out.tokens)  # every rank's next step may read them (async scheduling)
        self.previous_tokens = out.tokens
        logprobs = (out.logprob_ids, out.logprobs, out.ranks) if out.logprobs is not None else None
        return LaunchedStep.copy_to_host(out.tokens, logprobs, prompt_logprobs)

    def prompt_logprobs(self, step: StepMessage, hidden: torch.Tensor) -> list[torch.Tensor] | None:
        """For each row of step.prompt_logprobs, over its new tokens: logprobs_of's (ids, logprobs, ranks) of the next
        prompt token and the top k, each flattened and concatenated in row order (rank 0 only; the others join the
        lm_head's gather)."""
        offsets = np.cumsum([0, *step.num_new_tokens])
        columns: list[list[torch.Tensor]] = [[], [], []]
        for row, k, targets in step.prompt_logprobs:
            for start in range(offsets[row], offsets[row + 1], PROMPT_LOGITS_ROWS):  # [rows, vocab] fp32 at most
                end = min(start + PROMPT_LOGITS_ROWS, offsets[row + 1])
                logits = self.model.compute_logits(hidden[start:end])
                if logits is None:
                    continue
                chunk = targets[start - offsets[row] : end - offsets[row]]
                target = torch.tensor(chunk, dtype=torch.int64).clamp(min=0).to(self.device)
                parts = logprobs_of(logits, target, k)
                for column, part in zip(columns, parts):
                    column.append(part.flatten())
        return [torch.cat(column) for column in columns] if columns[0] else None

    @torch.inference_mode()
    def warm_up_sampler(self) -> None:
        """Compile the sampler's one torch.compile'd function, penalized() (the penalties of a step that also has
        greedy rows or top-k/top-p/min-p; the common draw runs csrc/sampler.cu), now rather than mid-run:
        torch.compile specialises a batch of one row, so one row and the most rows a step samples compile the two
        graphs that every later batch reuses. A generator and counts of their own leave the engine's draws and
        penalty counts untouched."""
        args = self.config.args
        largest = min(args.max_num_seqs, args.max_num_batched_tokens)  # as profile_free_blocks samples
        generator = torch.Generator(self.device)
        hidden = torch.zeros(largest, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        counts = PenaltyCounts(self.config.source.config.vocab_size, largest + 1, self.device)
        counts.fill(largest + 1, None, None, None)
        for rows in sorted({1, largest}):
            logits = self.model.compute_logits(hidden[:rows])  # every rank: the lm_head gathers across them
            if logits is None:
                continue
            # a tensor of its own for each argument, and one slot more than rows: torch.compile specialises
            # arguments that are one tensor, and sizes or offsets that happen to be equal, and would compile again
            # mid-run for the engine's columns (views of one buffer)
            columns = [torch.ones(rows, dtype=torch.float32, device=self.device) for _ in range(4)]
            slots = torch.arange(rows, device=self.device)
            batch = SamplingBatch(columns[0], top_k=None, top_p=None, min_p=None, seeded_rows=[], all_greedy=False,
                                  any_greedy=True, generator=generator,
                                  penalties=Penalties(slots, slots, *columns[1:], counts), num_logprobs=1)
            sample(logits, batch)

    # ----- CUDA graphs ----------------------------------------------------------------------------------
    def graph_batch_sizes(self) -> list[int]:
        largest = min(self.config.args.max_num_seqs, 512)
        return [s for s in (1, 2, 4, 8) if s < largest] + list(range(16, largest, 16)) + [largest]

    @torch.inference_mode()
    def capture_decode_graphs(self) -> tuple:
        """One graph per batch-size bucket, largest first, all in one memory pool (returned, for the prefill's
        graphs); inputs padded at replay."""
        start = time.perf_counter()
        sizes = self.graph_batch_sizes()
        largest = sizes[-1]
        hidden = torch.zeros(largest, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        pool = None
        for size in reversed(sizes):
            args = self.inputs.decode_views(size)
            hidden[:size] = self.model(*args)  # warm-up outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                hidden[:size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
            torch.cuda.synchronize()
        self.captured_graphs += self.graphs.values()
        self.graph_hidden = hidden
        self.graph_capture_seconds = time.perf_counter() - start
        return pool


def pool_bytes(pool: tuple) -> int:
    """Bytes of the caching allocator's segments in graph memory pool `pool` (what its graphs keep reserved)."""
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == tuple(pool))


def release_graphs(graphs: list[torch.cuda.CUDAGraph]) -> None:
    """Destroy captured graphs. NCCL cannot destroy (or abort) a communicator while a graph that captured one
    of its collectives lives, so tensor parallelism calls this on every rank before leaving its group."""
    for graph in graphs:
        graph.reset()
    graphs.clear()


@dataclass
class LaunchedStep:
    """A launched step's sampled tokens (and their logprobs): on the device at once, readable on the host once
    the step is done."""

    tokens: torch.Tensor  # [sampling rows] int64 on the device
    host_tokens: torch.Tensor  # their copy in pinned memory (on the CPU: the same tensor)
    done: torch.cuda.Event | None = None  # recorded after the copies
    # (ids, logprobs, ranks) on the host, when a row asked for logprobs (SamplerOutput's)
    host_logprobs: list[torch.Tensor] | None = None
    host_prompt_logprobs: list[torch.Tensor] | None = None  # see ModelRunner.prompt_logprobs

    @classmethod
    def copy_to_host(cls, tokens: torch.Tensor, logprobs: tuple[torch.Tensor, ...] | None,
                     prompt_logprobs: list[torch.Tensor] | None = None) -> "LaunchedStep":
        if not tokens.is_cuda and not (prompt_logprobs and prompt_logprobs[0].is_cuda):
            return cls(tokens, tokens, None, list(logprobs) if logprobs else None, prompt_logprobs)
        logprobs, prompt_logprobs = list(logprobs or []), prompt_logprobs or []
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in (tokens, *logprobs, *prompt_logprobs)]
        done = torch.cuda.Event()
        done.record()
        return cls(tokens, host[0], done, host[1 : 1 + len(logprobs)] or None, host[1 + len(logprobs) :] or None)

    def token_ids(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host_tokens.tolist()

    def logprobs(self) -> tuple[list, ...] | None:
        """(ids, logprobs, ranks) as lists, a row each (SamplerOutput's); after token_ids()."""
        return tuple(t.tolist() for t in self.host_logprobs) if self.host_logprobs is not None else None

    def prompt_logprobs(self) -> tuple[list, ...] | None:
        """ModelRunner.prompt_logprobs' columns as flat lists; after token_ids()."""
        return tuple(t.tolist() for t in self.host_prompt_logprobs) if self.host_prompt_logprobs else None


def available_memory_bytes() -> int:
    """The memory the system can give without swapping (Linux's MemAvailable), else its free pages."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU from rank 0's (the CPU for all ranks on the CPU)."""
    return torch.device("cuda", device.index + rank) if device.type == "cuda" else device


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
