"""One generation request, checked once: the contract the eager loop and the fast engine share.

`prepare` takes what a caller passes to `minqwen.generate` (or `FastQwen2.generate`) and returns a
`GenerationRequest` in which nothing is left to chance:

- every setting the caller leaves out (`None`) comes from the checkpoint's `generation_config.json`, and what that
  file leaves out from transformers' own defaults, the order in which `model.generate()` resolves them;
- the end tokens and the id that pads finished rows are resolved the same way;
- every input that would fail later, or silently mislead, is rejected here, before the first forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minqwen.engine.sampling import SamplingConfig
from minqwen.model.config import ModelConfig


class NumericalError(RuntimeError):
    """The model produced NaN or infinite logits: its weights or its inputs are broken."""


@dataclass(frozen=True)
class GenerationRequest:
    """Validated inputs of one generation: a left-padded batch, its settings, and when to stop."""

    input_ids: torch.Tensor  # [batch, prompt]
    attention_mask: torch.Tensor  # [batch, prompt]: 1 for a real token, 0 for left padding
    max_new_tokens: int
    sampling: SamplingConfig
    eos_ids: tuple[int, ...]  # any of these ends a row; () never stops early
    pad_id: int | None  # what a finished row emits while the others go on
    seed: int | None

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())

    def positions(self) -> torch.Tensor:
        """Each token's position, counting real tokens only, so padding does not shift a prompt."""
        mask = self.attention_mask
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def prepare(
    config: ModelConfig,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationRequest:
    """Check a request against the model's `config` and resolve its defaults.

    A sampling setting left as `None` takes the checkpoint's value, then transformers' default, so that
    `generate(model, ids, n, **kw)` equals `torch.manual_seed(seed); hf_model.generate(ids, max_new_tokens=n, **kw)`
    for any `kw`. `eos_token_id=None` means the checkpoint's end tokens and `[]` never stops early;
    `pad_token_id=None` means the checkpoint's pad id, else the first end token.
    """
    sampling = SamplingConfig.resolve(
        config.sampling_defaults,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    _check_max_new_tokens(max_new_tokens)
    _check_ids(input_ids, config.vocab_size)
    attention_mask = _checked_mask(input_ids, attention_mask)
    batch, prompt = input_ids.shape
    limit = config.max_position_embeddings
    if prompt + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = {prompt + max_new_tokens} "
            f"exceeds the model's max_position_embeddings ({limit}); shorten the prompt or ask for fewer tokens"
        )
    eos_ids = _token_ids(
        config.eos_token_ids if eos_token_id is None else eos_token_id, "eos_token_id", config
    )
    pad_id = config.pad_token_id if pad_token_id is None else pad_token_id
    if pad_id is None and eos_ids:
        pad_id = eos_ids[0]
    if pad_id is not None:
        _token_ids(pad_id, "pad_token_id", config)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return GenerationRequest(
        input_ids, attention_mask, max_new_tokens, sampling, eos_ids, pad_id, seed
    )


def _check_max_new_tokens(max_new_tokens) -> None:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def _check_ids(input_ids, vocab_size: int) -> None:
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype != torch.long
    ):
        raise ValueError(
            "input_ids must be a 2-D LongTensor [batch, prompt]; for a single prompt use ids.unsqueeze(0), "
            f"got {type(input_ids).__name__} {getattr(input_ids, 'shape', '')}".rstrip()
        )
    batch, prompt = input_ids.shape
    if batch == 0:
        raise ValueError("the batch is empty (input_ids has 0 rows); pass at least one prompt")
    if prompt == 0:
        raise ValueError(
            "the prompt is empty (input_ids has 0 columns); a model needs at least one token to continue"
        )
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if outside.any():
        row, column = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"input_ids[{row}, {column}] = {int(input_ids[row, column])} is not a token id: this model's "
            f"vocabulary is 0..{vocab_size - 1}. Encode text with the model's own tokenizer"
        )


def _checked_mask(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """The attention mask as 0/1 longs on the ids' device, all ones when none was given."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(getattr(attention_mask, "shape", ()))
        raise ValueError(
            f"attention_mask has shape {shape} but input_ids has {tuple(input_ids.shape)}; they must match"
        )
    attention_mask = attention_mask.to(input_ids.device).long()
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError(
            "attention_mask has padding after real tokens (right padding); decoder-only generation needs "
            "left padding: use tokenizer(..., padding_side='left') or put the zeros first"
        )
    if (attention_mask.sum(dim=1) == 0).any():
        raise ValueError("a row of attention_mask is all padding: that prompt is empty")
    return attention_mask


def _token_ids(ids, name: str, config: ModelConfig) -> tuple[int, ...]:
    """One id or a list of them, each an integer in the vocabulary."""
    checked = []
    for i in [ids] if not isinstance(ids, (list, tuple)) else ids:
        if (
            isinstance(i, bool)
            or not hasattr(i, "__index__")
            or not 0 <= int(i) < config.vocab_size
        ):
            raise ValueError(f"{name} must be token ids in 0..{config.vocab_size - 1}, got {i!r}")
        checked.append(int(i))
    return tuple(checked)


def check_shared_draws(tensor_parallel, request: GenerationRequest) -> None:
    """Every rank of a tensor-parallel model (chapter 8) must pick the same token, or their caches part: sampling
    needs a seed, the same on every rank, so that each draws what the others draw."""
    if tensor_parallel is not None and not request.sampling.greedy and request.seed is None:
        raise ValueError(
            "sampling on a model split across processes needs a seed, the same on every rank, so that every "
            "rank draws the same token: pass seed=, or sample greedily"
        )
