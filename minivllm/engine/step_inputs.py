"""A step's input tensors, built from its StepMessage in one place for every kind of step (prefill, eager
decode, CUDA-graph decode) and sent to the device in one host-to-device copy.

Every input lives in one device byte buffer, at an offset a Layout gives. The host fills a pinned mirror of
that buffer and copies what the step uses. There are two mirrors, used in turn: when a step fills one, the
copy from the other may still be queued behind the step before (async scheduling), and a mirror is refilled only
once the copy from it has run (an event recorded after each copy). Collecting a step's tokens does not ensure
that: a prompt chunk that samples nothing has no tokens to wait for, so the host runs ahead through a long
prompt's chunks while the GPU works on the first, and a mirror refilled under its queued copy would send the GPU
parts of two steps' inputs (a decode step's block table read as a prompt chunk's token ids: the H200's failed
embedding index checks on the second 32k prompt fit that). A decode step's graph inputs come first, at offsets
that depend only on its padded row count: a graph captured over the views of one size reads the same addresses
at every replay. The sampling extras whose size has no bound (penalty histories, flat token lists) go the
same way through a second buffer that grows when it must, copied only in the steps that use them.
"""

from dataclasses import dataclass

import numpy as np
import torch

from minivllm.engine.step_message import StepMessage
from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.penalties import Penalties, PenaltyCounts
from minivllm.layers.sampler import COLUMNS, PENALTIES, SamplingBatch, SamplingRows

TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


class Layout:
    """Named arrays back to back in a byte buffer, each at a 16-byte aligned offset (torch.compile's kernels, the
    sampler's, assume that alignment of their inputs, and compile again for anything less)."""

    def __init__(self) -> None:
        self.fields: dict[str, tuple[int, torch.dtype, int]] = {}
        self.nbytes = 0

    def add(self, name: str, dtype: torch.dtype, count: int) -> None:
        offset = -(-self.nbytes // 16) * 16
        self.fields[name] = (offset, dtype, count)
        self.nbytes = offset + count * dtype.itemsize

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buffer[o : o + n * d.itemsize].view(d) for name, (o, d, n) in self.fields.items()}


class Staging:
    """A device byte buffer and its two pinned host mirrors, used in turn (see the module's docstring)."""

    def __init__(self, nbytes: int, device: torch.device, growable: bool):
        self.device, self.growable = device, growable
        self.allocate(nbytes)

    def allocate(self, nbytes: int) -> None:
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        pin = self.device.type == "cuda"
        self.mirrors = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # recorded after the last copy from each mirror
        self.turn = 0

    def host(self, layout: Layout) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """The next mirror and the layout's arrays in it, to fill."""
        if layout.nbytes > len(self.buffer):
            assert self.growable, "a step's fixed inputs outgrew their buffer"
            # the old buffers stay alive while a queued copy reads them (pinned memory is freed after its uses)
            self.allocate(1 << (layout.nbytes - 1).bit_length())
        mirror, copied = self.mirrors[self.turn], self.copied[self.turn]
        if copied is not None:
            copied.synchronize()  # almost always long done: the step that used this mirror was two steps ago
        self.turn ^= 1
        return mirror, {name: view.numpy() for name, view in layout.views(mirror).items()}

    def send(self, layout: Layout, mirror: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copy what the layout uses to the device; its arrays there."""
        self.buffer[: layout.nbytes].copy_(mirror[: layout.nbytes], non_blocking=True)
        if self.device.type == "cuda":
            turn = next(i for i, m in enumerate(self.mirrors) if m is mirror)
            self.copied[turn] = torch.cuda.Event()
            self.copied[turn].record()
        return layout.views(self.buffer)


def step_layout(is_prefill: bool, tokens: int, rows: int, width: int, samples: int, pending: int,
                columns: list[str]) -> Layout:
    layout = Layout()
    for name in ("input_ids", "positions", "slot_mapping"):
        layout.add(name, torch.int64, tokens)
    if is_prefill:
        layout.add("cu_seqlens_q", torch.int32, rows + 1)
        layout.add("cu_seqlens_k", torch.int32, rows + 1)
    else:
        layout.add("total_context_len", torch.int64, 1)
        layout.add("context_lens", torch.int32, rows)
    layout.add("block_tables", torch.int32, rows * width)
    # below this line nothing is read inside a captured graph
    if is_prefill:
        layout.add("sample_rows", torch.int64, samples)
    layout.add("pending_rows", torch.int64, pending)
    layout.add("pending_sources", torch.int64, pending)
    for name in columns:
        layout.add(name, COLUMNS[name][0], samples)
    return layout


def extras_layout(rows: SamplingRows) -> Layout:
    layout = Layout()
    for name, array in rows.arrays.items():
        layout.add(name, TORCH_DTYPES[array.dtype], array.size)
    return layout


@dataclass
class StagedStep:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor | None  # prefill: the rows of the hidden states that sample; decode: all
    sampling: SamplingBatch | None  # None on ranks other than 0, and when no row samples


class StepInputs:
    def __init__(self, max_tokens: int, max_rows: int, max_blocks: int, block_size: int, device: torch.device):
        self.max_blocks, self.block_size = max_blocks, block_size
        columns = list(COLUMNS)
        nbytes = max(
            step_layout(True, max_tokens, max_rows, max_blocks, max_rows, max_rows, columns).nbytes,
            step_layout(False, max_rows, max_rows, max_blocks, max_rows, max_rows, columns).nbytes,
        )
        self.inputs = Staging(nbytes, device, growable=False)
        self.extras = Staging(1 << 16, device, growable=True)

    def decode_views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, metadata) of a decode step padded to `rows`, as a graph of that size reads them;
        staging an empty step first makes every row padding, which writes and reads nothing."""
        staged = self.stage(StepMessage(False, [], [], [], [], [], []), rows, None, None, for_graph=True)
        return staged.input_ids, staged.positions, staged.meta

    def prefill_views(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, positions, slot mapping) of a prefill step padded to `tokens`, as a prefill graph of that
        size reads them (their addresses depend only on it); all padding now: token 0 at position 0, no slot."""
        layout = step_layout(True, tokens, 0, 0, 0, 0, [])
        mirror, host = self.inputs.host(layout)
        host["input_ids"][:] = host["positions"][:] = 0
        host["slot_mapping"][:] = -1
        device = self.inputs.send(layout, mirror)
        return device["input_ids"], device["positions"], device["slot_mapping"]

    def stage(self, step: StepMessage, rows: int, previous_tokens: torch.Tensor | None,
              generator: torch.Generator | None, penalty_counts: PenaltyCounts | None = None,
              for_graph: bool = False, graph_tokens: int | None = None) -> StagedStep:
        """Lay the step out in the next host mirror (decode padded to `rows`, a prefill to graph_tokens if given),
        copy it to the device, and put in the tokens still on the GPU from previous_tokens, the tokens the step
        before sampled. A decode graph's block tables are as wide as the longest sequence can need; elsewhere as
        the batch's widest (the CPU's reference attention reads every entry)."""
        n, prefill = step.num_rows, step.is_prefill
        lengths = np.asarray(step.num_new_tokens, dtype=np.int64)
        starts = np.asarray(step.start_positions, dtype=np.int64)
        ends = starts + lengths
        paged = not prefill or bool(starts.any())  # prefill reads keys from the pages once some are cached
        width = (self.max_blocks if for_graph else max(map(len, step.block_tables))) if paged else 0
        columns = step.sampling.used_columns() if step.sampling is not None else {}
        layout = step_layout(prefill, (graph_tokens or step.num_tokens) if prefill else rows, rows, width,
                             len(step.sampling_rows), len(step.pending), list(columns))
        mirror, host = self.inputs.host(layout)
        tables = host["block_tables"].reshape(rows, width) if paged else np.zeros((n, max(map(len, step.block_tables))),
                                                                                  dtype=np.int32)
        for row, table in enumerate(step.block_tables):  # entries past a row's last block are never read
            tables[row, : len(table)] = table
        cu_q = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu_q[1:])
        row_of = np.repeat(np.arange(n), lengths)
        positions = np.arange(step.num_tokens) - cu_q[row_of] + starts[row_of]
        t = step.num_tokens
        host["input_ids"][:t] = step.token_ids
        host["positions"][:t] = positions
        bs = self.block_size
        host["slot_mapping"][:t] = tables[row_of, positions // bs] * bs + positions % bs
        host["input_ids"][t:] = host["positions"][t:] = 0  # padding tokens (graphs): nothing to write or read
        host["slot_mapping"][t:] = -1
        if prefill:
            host["cu_seqlens_q"][:] = cu_q
            host["cu_seqlens_k"][0] = 0
            np.cumsum(ends, out=host["cu_seqlens_k"][1:])
            host["sample_rows"][:] = cu_q[1:][step.sampling_rows] - 1
        else:  # padding rows: nothing to attend to
            host["context_lens"][:n] = ends
            host["context_lens"][n:] = 0
            host["total_context_len"][0] = ends.sum()
        for i, (row, source) in enumerate(step.pending):
            host["pending_rows"][i] = cu_q[row + 1] - 1
            host["pending_sources"][i] = source
        for name, values in columns.items():
            host[name][:] = values
        device = self.inputs.send(layout, mirror)
        if step.pending:
            put_pending_tokens(device, step, previous_tokens)
        if prefill:
            meta = AttentionMetadata(
                True, device["slot_mapping"], device["cu_seqlens_q"], device["cu_seqlens_k"], int(lengths.max()),
                int(ends.max()), block_tables=device["block_tables"].view(rows, width) if paged else None,
            )
        else:
            meta = AttentionMetadata(
                False, device["slot_mapping"], context_lens=device["context_lens"],
                block_tables=device["block_tables"].view(rows, width), total_context_len=device["total_context_len"],
            )
        sampling = None
        if step.sampling is not None and step.sampling_rows:
            sampling = self.sampling_batch(step.sampling, device, generator, penalty_counts)
        return StagedStep(device["input_ids"], device["positions"], meta,
                          device["sample_rows"] if prefill else None, sampling)

    def sampling_batch(self, rows: SamplingRows, device: dict[str, torch.Tensor], generator: torch.Generator | None,
                       penalty_counts: PenaltyCounts | None) -> SamplingBatch:
        """The sampler's view of the rows: their columns from the step's buffer, the extras through their own."""
        arrays, penalties = None, None
        if rows.arrays:
            layout = extras_layout(rows)
            mirror, host = self.extras.host(layout)
            for name, array in rows.arrays.items():
                host[name][:] = array.reshape(-1)
            extras = self.extras.send(layout, mirror)
            arrays = {name: extras[name].view(array.shape) for name, array in rows.arrays.items()}
            if rows.num_penalty_slots:
                penalties = self.penalties(rows, arrays, device, penalty_counts)
        temperatures = rows.columns["temperatures"]
        return SamplingBatch(
            temperatures=device["temperatures"],
            top_k=device.get("top_k"),
            top_p=device.get("top_p"),
            min_p=device.get("min_p"),
            seeded_rows=[(row, g) for row, g in enumerate(rows.generators) if g is not None],
            all_greedy=all(t == 0 for t in temperatures),
            any_greedy=any(t == 0 for t in temperatures),
            generator=generator,
            arrays=arrays,
            penalties=penalties,
            num_logprobs=rows.num_logprobs,
            bitmask=rows.bitmask,
        )

    @staticmethod
    def penalties(rows: SamplingRows, arrays: dict[str, torch.Tensor], device: dict[str, torch.Tensor],
                  counts: PenaltyCounts) -> Penalties:
        """The step's penalties (taking their arrays out of arrays), after filling the slots taken this step."""
        counts.fill(rows.num_penalty_slots, arrays.pop("fill_slots", None), arrays.pop("fill_prompt", None),
                    arrays.pop("fill_outputs", None))
        return Penalties(arrays.pop("penalty_rows"), arrays.pop("penalty_slots"), *(device[n] for n in PENALTIES),
                         counts)


def put_pending_tokens(device: dict[str, torch.Tensor], step: StepMessage, previous_tokens: torch.Tensor) -> None:
    """The step's tokens still on the GPU, from the tokens the step before sampled: one copy when this is that
    step's batch in its order (decode after decode), else a gather."""
    n = step.num_rows
    if (not step.is_prefill and len(step.pending) == n == len(previous_tokens)
            and all(row == source for row, source in step.pending)):
        device["input_ids"][:n].copy_(previous_tokens)
    else:
        device["input_ids"][device["pending_rows"]] = previous_tokens[device["pending_sources"]]
