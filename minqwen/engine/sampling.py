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
# What transformers' generate() uses for a setting that neither the caller nor the checkpoint's
# generation_config.json sets (GenerationConfig._get_default_generation_params). Note top_k: 50, not off.
TRANSFORMERS_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
# Logits are divided by the temperature: outside this range the result overflows float32 or flattens to noise.
TEMPERATURE_RANGE = (1e-3, 1e3)


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
        low, high = TEMPERATURE_RANGE
        if self.temperature != 0 and not low <= self.temperature <= high:
            raise ValueError(
                f"temperature must be 0 (greedy) or between {low:g} and {high:g}, got {self.temperature:g}: "
                f"dividing the logits by it would overflow or flatten them"
            )
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

    @classmethod
    def resolve(cls, checkpoint: dict, **passed) -> SamplingConfig:
        """The caller's settings (None: not passed) over the checkpoint's over transformers' defaults."""
        given = {name: value for name, value in passed.items() if value is not None}
        return cls(**{**TRANSFORMERS_DEFAULTS, **checkpoint, **given})

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def seen_tokens(
    previous_ids: torch.Tensor, vocab: int, ignore_before: torch.Tensor | None = None
) -> torch.Tensor:
    """[batch, vocab] True where a token occurs in its row of `previous_ids`.

    `ignore_before` [batch] skips each row's first positions, so left padding counts as nothing seen.
    """
    ids = previous_ids
    if ignore_before is not None:
        position = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(position[None, :] < ignore_before[:, None].to(ids.device), vocab)
    # One spare column collects the skipped positions (and any id past the head's vocabulary), then is dropped.
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids.clamp(max=vocab), True)
    return seen[:, :vocab]


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide the positive logits of seen tokens by `penalty` and multiply their negative ones."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen.to(logits.device), penalised, logits)


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
    seen = seen_tokens(previous_ids.to(logits.device), logits.shape[-1], ignore_before)
    return penalize_seen(logits, seen, penalty)


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
    previous_ids: torch.Tensor | None,
    config: SamplingConfig,
    ignore_before: torch.Tensor | None = None,
    *,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scores a token is chosen from, with each filter applied only where transformers applies it.

    The repetition penalty applies to greedy decoding too; the other filters only when sampling. It reads the
    tokens seen so far from `previous_ids`, or from a `seen` mask kept up to date by the caller.
    """
    scores = logits
    if config.repetition_penalty != 1.0:
        if seen is None:
            seen = seen_tokens(previous_ids.to(logits.device), logits.shape[-1], ignore_before)
        scores = penalize_seen(scores, seen, config.repetition_penalty)
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


def sample_without_sync(
    logits: torch.Tensor, seen: torch.Tensor, config: SamplingConfig
) -> torch.Tensor:
    """[batch] next tokens from the distribution that `process_logits` and `select_next_token` give, computed
    with no host sync and no data-dependent shape, so that a CUDA graph can capture it.

    Two changes of method, not of distribution. Top-p and min-p run on the top-k survivors only (sorted
    descending, keeping a token while the mass before it is below top_p, which is transformers' ascending rule
    turned around). The draw is an exponential race: with E_i ~ Exp(1), argmax_i p_i / E_i is token i with
    probability p_i. The draws differ from `torch.multinomial`'s for the same seed; their distribution does not.
    """
    scores = logits
    if config.repetition_penalty != 1.0:
        scores = penalize_seen(scores, seen, config.repetition_penalty)
    if config.greedy:
        return scores.argmax(dim=-1)
    if config.temperature != 1.0:
        scores = scores / config.temperature
    candidates = None
    if config.top_k:
        scores, candidates = torch.topk(scores, min(config.top_k, scores.shape[-1]))
    elif config.top_p < 1.0:
        scores, candidates = torch.sort(scores, descending=True)
    if config.top_p < 1.0:
        probs = scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        scores = scores.masked_fill(mass_before >= config.top_p, FILTERED)
    if config.min_p > 0.0:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(
            probs < config.min_p * probs.amax(dim=-1, keepdim=True), FILTERED
        )
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_()
    choice = (probs / race).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)
