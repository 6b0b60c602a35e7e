"""Sampling vectorised over the batch: greedy, temperature, top-k, top-p, min-p, per-request seeds, the logits
processors vLLM applies first (allowed tokens, bans, logit bias, presence / frequency / repetition penalties),
and the logprobs of the model's raw distribution.

Sampling draws argmax(probs / E) with E ~ Exp(1), which picks token i with probability probs[i]; a
request with a seed draws its row of E from its own generator, so its tokens do not depend on the batch.
Every processor runs on the device over flat index arrays (one op each), never a loop over rows or the vocab.
"""

from dataclasses import dataclass

import numpy as np
import torch

from minivllm import ops
from minivllm.layers.penalties import Penalties, apply_penalties
from minivllm.ops.reference import gumbel_max

# The per-row sampling columns: name -> (dtype, the value that means "off", None when a column is always sent).
COLUMNS = {
    "temperatures": (torch.float32, None),
    "top_k": (torch.int64, 0),
    "top_p": (torch.float32, 1.0),
    "min_p": (torch.float32, 0.0),
    "presence_penalty": (torch.float32, 0.0),
    "frequency_penalty": (torch.float32, 0.0),
    "repetition_penalty": (torch.float32, 1.0),
}
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass(frozen=True)
class SamplingRows:
    """A step's sampling rows as the engine hands them to the runner, on the host: per-row columns (sent to the
    device only when some row uses them) and flat arrays for the processors that touch a few tokens a row."""

    columns: dict[str, list]  # every name of COLUMNS, one value a row
    generators: list[torch.Generator | None]  # a request's own, when it has a seed
    # flat (row, token) pairs, each an int64 array: tokens a row may not draw (min_tokens, bad words); the only
    # tokens a row may draw (for "allowed_rows", the rows that restrict); logit bias, with its float32 values;
    # the rows with penalties ("penalty_rows"), every row's slot ("penalty_slots"), and for the slots taken this
    # step ("fill_slots"), (slot, token) pairs of their prompt and output tokens (layers/penalties.py)
    arrays: dict[str, np.ndarray]
    num_penalty_slots: int = 0  # the slots the penalty counts must hold this step; 0 when no row has penalties
    num_logprobs: int = -1  # the most top logprobs a row asks for (0: the sampled token's alone); -1: no row asks
    bitmask: torch.Tensor | None = None  # structured outputs: each row's allowed tokens (structured_outputs.py)

    def used_columns(self) -> dict[str, list]:
        """The columns some row uses; the three penalties together whenever a row has one."""
        def used(name: str) -> bool:
            off = COLUMNS[name][1]
            return off is None or any(v != off for v in self.columns[name]) or (
                name in PENALTIES and self.num_penalty_slots)
        return {name: values for name, values in self.columns.items() if used(name)}


@dataclass
class SamplingBatch:
    """SamplingRows on the device, as sample() reads them (None: no row uses it)."""

    temperatures: torch.Tensor  # [B], 0 for greedy rows
    top_k: torch.Tensor | None  # [B] int, 0 off
    top_p: torch.Tensor | None  # [B]
    min_p: torch.Tensor | None  # [B]
    seeded_rows: list[tuple[int, torch.Generator]]
    all_greedy: bool
    any_greedy: bool
    generator: torch.Generator | None = None  # draws for rows without a seed: the engine's, seeded by LLM(seed=)
    arrays: dict[str, torch.Tensor] | None = None  # SamplingRows.arrays on the device
    penalties: Penalties | None = None
    num_logprobs: int = -1
    bitmask: torch.Tensor | None = None  # on the host: apply_bitmask copies it


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    # with logprobs, of the raw distribution (log-softmax of the logits before any processor): each row's sampled
    # token then its top num_logprobs, ids and fp32 logprobs [B, 1 + k], and the sampled token's 1-based rank [B]
    logprob_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Next token ids [B] from logits [B, V], with their logprobs if asked."""
    # the common draw (a temperature on every row, no top-k/top-p/min-p) applies the penalties inside its own pass
    penalties_in_draw = batch.penalties is not None and not batch.any_greedy and plain_temperature(batch)
    processed = process_logits(logits, batch, with_penalties=not penalties_in_draw)
    tokens = choose(processed, batch, batch.penalties if penalties_in_draw else None)
    if batch.num_logprobs < 0:
        return SamplerOutput(tokens)
    return SamplerOutput(tokens, *logprobs_of(logits, tokens, batch.num_logprobs))


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Of the log-softmax of logits [B, V], never made: the ids and logprobs [B, 1 + k] of each row's token in
    tokens [B] and then of its top k, and that token's 1-based rank [B] (the layout FlatLogprobs keeps). The top k
    of the logits are those of their log-softmax, and one pass of csrc/sampler.cu gives each row's log-sum-exp and
    the count of tokens above its own."""
    chosen = logits.gather(1, tokens.unsqueeze(1)).float()
    log_sum_exp, above = ops.sampler_logsumexp_rank(logits, tokens)
    if k:
        top_logits, top_ids = top_k(logits, k)
        ids, chosen = torch.cat([tokens.unsqueeze(1), top_ids], dim=1), torch.cat([chosen, top_logits.float()], dim=1)
    else:
        ids = tokens.unsqueeze(1)
    return ids, chosen - log_sum_exp.unsqueeze(1), above + 1


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, k) over rows of a large vocabulary, through each row's k chunks with the highest maxima:
    they hold its k largest values (a value outside them has k chunk maxima at or above it). One pass for the
    chunk maxima and a top-k over k chunks, against torch.topk's radix passes over the whole row: for 256 rows of
    151,936 and k = 5, 0.333 ms against 0.637 in one H200 run (benchmarks.sampler)."""
    rows, vocab = logits.shape
    chunks = next(c for c in (128, 64, 32, 16, 8, 4, 2, 1) if vocab % c == 0)
    if chunks <= k:
        return logits.topk(k, dim=-1)
    width = vocab // chunks
    chunked = logits.reshape(rows, chunks, width)
    best = chunked.amax(dim=-1).topk(k, dim=-1).indices  # [rows, k]
    candidates = chunked.gather(1, best.unsqueeze(-1).expand(-1, -1, width)).view(rows, k * width)
    values, where = candidates.topk(k, dim=-1)
    return values, best.gather(1, where // width) * width + where % width


def process_logits(logits: torch.Tensor, batch: SamplingBatch, with_penalties: bool = True) -> torch.Tensor:
    """vLLM's logits processors, in its order: the grammar's mask, allowed tokens, bans, logit bias, penalties
    (unless not with_penalties: the draw applies them). Never in place: the logprobs are of the logits as the
    model made them."""
    arrays = batch.arrays or {}
    if batch.bitmask is not None or "allowed" in arrays or "banned" in arrays or "bias" in arrays:
        logits = logits.to(torch.float32, copy=True)  # these write in place
    if batch.bitmask is not None:
        from minivllm.structured_outputs import apply_bitmask  # only with structured outputs: it imports xgrammar

        apply_bitmask(logits, batch.bitmask)
    if "allowed" in arrays:  # the rows that restrict ("allowed_rows") may draw their allowed ids alone
        rows, ids = arrays["allowed"]
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[rows, ids] = True
        restricted = arrays["allowed_rows"]
        logits[restricted] = logits[restricted].masked_fill(~keep[restricted], float("-inf"))
    if "banned" in arrays:
        rows, ids = arrays["banned"]
        logits[rows, ids] = float("-inf")
    if "bias" in arrays:
        rows, ids = arrays["bias"]
        logits.index_put_((rows, ids), arrays["bias_values"], accumulate=True)
    if batch.penalties is not None and with_penalties:
        logits = apply_penalties(logits, batch.penalties)
    return logits


def plain_temperature(batch: SamplingBatch) -> bool:
    return batch.min_p is None and batch.top_k is None and batch.top_p is None


def choose(logits: torch.Tensor, batch: SamplingBatch, penalties: Penalties | None = None) -> torch.Tensor:
    """The sampled token of each row: argmax for greedy rows, else a draw under temperature, min-p, top-k/p; with
    penalties (only for a plain temperature draw), those applied first, in the draw's pass."""
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=batch.generator)
    for row, generator in batch.seeded_rows:
        noise[row].exponential_(generator=generator)
    if plain_temperature(batch):  # the common case, one pass of csrc/sampler.cu
        tables = () if penalties is None else penalties.tables()
        sampled = ops.sampler_gumbel_argmax(logits, noise, batch.temperatures, *tables)
    else:
        sampled = gumbel_max(filtered_logits(logits, batch), noise)
    if not batch.any_greedy:
        return sampled
    return torch.where(batch.temperatures == 0, logits.argmax(dim=-1), sampled)


def filtered_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature-scaled fp32 logits with what min-p, top-k and top-p exclude set to -inf."""
    logits = logits.float() / batch.temperatures.clamp(min=1e-5).unsqueeze(1)  # greedy rows are replaced later
    if batch.min_p is not None:  # before top-k/top-p, as vLLM: top-p then sees what min-p left, renormalised
        probs = logits.softmax(dim=-1)
        floor = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Logits with every token outside each row's top-k and top-p nucleus set to -inf (the best always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        k = top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill((ranks >= k) & (k > 0), float("-inf"))
    if top_p is not None:  # the nucleus of what top-k left, as vLLM does
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
