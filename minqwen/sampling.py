"""Choosing the next token: repetition penalty, temperature, top-k, top-p, min-p, then argmax or one random draw.

Each filter takes logits [batch, vocab] and returns new logits, with the tokens it removes set to -inf. They are
written to give transformers' logits processors bit for bit, because `minqwen.generate` promises the tokens of
`torch.manual_seed(seed); model.generate(...)`. That needs three things to agree: the same float32 logits, the same
operations in the same order (repetition penalty -> temperature -> top-k -> top-p -> min-p), and the same single
`torch.multinomial` draw per step on the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FILTERED = -float("inf")


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token. `do_sample=False`, or a temperature of 0, means greedy (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 turns top-k off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns top-p off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 turns min-p off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    penalty: float,
    ignore_before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Make every token already in `previous_ids` less likely: divide a positive logit by `penalty`, multiply a
    negative one. Each token is penalised once however often it appeared.

    `ignore_before` [batch] skips each row's first positions, so left padding counts as nothing seen.
    """
    vocab = logits.shape[-1]
    ids = previous_ids
    if ignore_before is not None:
        position = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(position[None, :] < ignore_before[:, None].to(ids.device), vocab)
    # One spare column collects the skipped positions (and any id past the head's vocabulary), then is dropped.
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids.clamp(max=vocab).to(logits.device), True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, :vocab], penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Below 1 sharpens the distribution, above 1 flattens it. (0 never gets here: it means greedy.)"""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` highest logits. A tie with the k-th value is kept too, so more than k may survive."""
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth_value = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth_value, FILTERED)


def top_p_filter(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the most probable tokens whose probabilities first add up to at least `top_p`.

    Computed from the least probable end, as transformers does: sort ascending, accumulate, and drop the tokens
    whose running total stays within the `1 - top_p` tail. Accumulating in the other direction would round
    differently and, at the boundary, keep a different set.
    """
    sorted_logits, order = torch.sort(logits, descending=False)
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = tail_mass <= 1 - top_p
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, FILTERED)


def min_p_filter(logits: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep tokens at least `min_p` times as probable as the most probable one: a cut that follows confidence."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    drop.scatter_(-1, keep, False)
    return logits.masked_fill(drop, FILTERED)


def process_logits(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    config: SamplingConfig,
    ignore_before: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scores a token is chosen from, with each filter applied only where transformers applies it.

    The repetition penalty applies to greedy decoding too; the other filters only when sampling.
    """
    scores = logits
    if config.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(
            scores, previous_ids, config.repetition_penalty, ignore_before
        )
    if config.greedy:
        return scores
    if config.temperature != 1.0:
        scores = apply_temperature(scores, config.temperature)
    if config.top_k != 0:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    if config.min_p > 0.0:
        scores = min_p_filter(scores, config.min_p)
    return scores


def select_next_token(scores: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """[batch] token ids: the argmax, or one draw from softmax(scores) on the global RNG."""
    if config.greedy:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
