"""The generate loop: one forward pass per new token.

With `use_cache=True` (the default) the prompt is prefilled once and each later step feeds only the newest token,
its position offset by what the cache already holds. `use_cache=False` is the naive loop: every step runs the
whole sequence again. Batches are left-padded with an `attention_mask`; positions count real tokens only, so each
row generates exactly what it would alone.

The loop mirrors transformers' `generate()` step for step: the same defaults (`minqwen.engine.request`), float32 logits,
the processors of `minqwen.engine.sampling` and finished rows padded. For the same seed it gives the same tokens.
It drives any model with minqwen's interface: `Qwen2`, or a transformers model wrapped in
`minqwen.tools.hf_adapter.HFAdapter`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minqwen.engine.request import (
    GenerationRequest,
    NumericalError,
    check_shared_draws,
    prepare,
)
from minqwen.engine.sampling import process_logits, select_next_token


def generate_tokens(
    model, input_ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True, **settings
) -> Iterator[torch.LongTensor]:
    """Yield the next token of every row, [batch], one step at a time.

    `settings` are those of `minqwen.engine.request.prepare`: do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, attention_mask, eos_token_id and pad_token_id. Each one left out takes the
    checkpoint's generation_config.json value, as in transformers. Every argument is checked here, before the first
    forward pass. Rows that have finished emit the pad id until every row is done, then the iterator stops.
    """
    request = prepare(model.config, input_ids, max_new_tokens, **settings)
    check_shared_draws(getattr(model, "tensor_parallel", None), request)
    return decode(model, request, use_cache=use_cache)


def generate(
    model, input_ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True, **settings
) -> torch.LongTensor:
    """The prompt followed by the new tokens, [batch, prompt + new]: what `model.generate` returns.

    Fewer than `max_new_tokens` come back when every row has reached an end token.
    """
    steps = generate_tokens(model, input_ids, max_new_tokens, use_cache=use_cache, **settings)
    return torch.cat([input_ids, *(token[:, None] for token in steps)], dim=1)


def decode(
    model, request: GenerationRequest, *, use_cache: bool = True
) -> Iterator[torch.LongTensor]:
    """The loop itself, over a checked request."""
    if request.seed is not None:
        torch.manual_seed(request.seed)
    sampling, eos_ids, pad_id = request.sampling, request.eos_ids, request.pad_id
    # Without padding the mask carries no information; leaving it out keeps attention on the plain causal path,
    # exactly as transformers' generate() does, so the floating-point results match it too.
    mask = request.attention_mask if request.padded else None
    ignore_before = request.attention_mask.argmax(dim=1) if request.padded else None
    positions = request.positions()
    eos = torch.tensor(eos_ids, dtype=torch.long, device=request.input_ids.device)
    unfinished = torch.ones(
        request.input_ids.shape[0], dtype=torch.bool, device=request.input_ids.device
    )
    cache = model.new_cache() if use_cache else None

    sequence = step_ids = request.input_ids
    step_positions = positions
    for step in range(request.max_new_tokens):
        with torch.inference_mode():
            logits = model(
                step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                cache=cache,
                logits_to_keep=1,
            )[:, -1].float()
            check_finite(logits, step)
            scores = process_logits(logits, sequence, sampling, ignore_before)
            next_tokens = select_next_token(scores, sampling)
        if eos_ids:
            next_tokens = torch.where(unfinished, next_tokens, pad_id)
        sequence = torch.cat([sequence, next_tokens[:, None]], dim=1)
        yield next_tokens
        if eos_ids:
            unfinished &= ~torch.isin(next_tokens, eos)
            if not unfinished.any():
                return
        next_positions = positions[:, -1:] + 1
        positions = torch.cat([positions, next_positions], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if use_cache:
            step_ids, step_positions = next_tokens[:, None], next_positions
        else:
            step_ids, step_positions = sequence, positions


def check_finite(logits: torch.Tensor, step: int) -> None:
    finite = torch.isfinite(logits).all(dim=-1)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        raise NumericalError(
            f"the model's logits hold NaN or infinity at new token {step}, row {row}: its weights or "
            f"activations are broken (a corrupt checkpoint, or float16 overflow); check the weights with "
            f"`python -m minqwen fetch` and run in float32 or bfloat16"
        )
