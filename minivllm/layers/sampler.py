"""Sampling vectorised over the batch: greedy, temperature, top-k, top-p, min-p, and per-request seeds.

Sampling draws argmax(probs / E) with E ~ Exp(1), which picks token i with probability probs[i]; a
request with a seed draws its row of E from its own generator, so its tokens do not depend on the batch.
"""

from dataclasses import dataclass

import torch

from minivllm.layers.fusion import fused_on_gpu


@dataclass(frozen=True)
class SamplingRows:
    """The sampling parameters of a step's sampling rows, on the host, as the engine hands them to the runner."""

    temperatures: list[float]  # 0 for greedy rows
    top_k: list[int]  # 0 off
    top_p: list[float]
    min_p: list[float]
    generators: list[torch.Generator | None]  # a request's own, when it has a seed
    banned: list[list[int]]  # ids a row may not draw yet (min_tokens)


@dataclass
class SamplingBatch:
    """SamplingRows on the device, as sample() reads them."""

    temperatures: torch.Tensor  # [B], 0 for greedy rows
    top_k: torch.Tensor | None  # [B] int, 0 off; None when no row uses it
    top_p: torch.Tensor | None  # [B]
    min_p: torch.Tensor | None  # [B]
    seeded_rows: list[tuple[int, torch.Generator]]
    banned: list[tuple[int, list[int]]]  # rows that may not end yet (min_tokens) and the ids they may not draw
    all_greedy: bool
    any_greedy: bool
    generator: torch.Generator | None = None  # draws for rows without a seed: the engine's, seeded by LLM(seed=)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    vocab_size = logits.shape[-1]
    for row, ids in batch.banned:  # ids the model cannot produce (a user's stop id past the vocab) need no ban
        logits[row, [i for i in ids if 0 <= i < vocab_size]] = float("-inf")
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=batch.generator)
    for row, generator in batch.seeded_rows:
        noise[row].exponential_(generator=generator)
    if batch.min_p is None and batch.top_k is None and batch.top_p is None:
        sampled = temperature_gumbel_max(logits, batch.temperatures, noise)  # the common case, one fused pass
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


def gumbel_max(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(softmax(logits) / noise), taken in log space: the softmax's normaliser is the same for a whole row."""
    return (logits - noise.log()).argmax(dim=-1)


@fused_on_gpu
def temperature_gumbel_max(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return gumbel_max(logits.float() / temperatures.clamp(min=1e-5).unsqueeze(1), noise)


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
