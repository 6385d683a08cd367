"""The generate loop: one forward pass per new token, for a Hugging Face causal LM or minqwen's own `Qwen2`.

With `use_cache=True` (the default) the prompt is prefilled once and each later step feeds only the newest token,
its position offset by what the cache already holds. `use_cache=False` is the naive loop: every step runs the
whole sequence again. Batches are left-padded with an `attention_mask`; positions count real tokens only, so each
row generates exactly what it would alone. The loop mirrors transformers' `generate()` step for step (float32
logits, processors from `minqwen.sampling`, finished rows padded), so for the same seed it gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cache import DynamicKVCache
from .model import Qwen2
from .sampling import SamplingConfig, process_logits, select_next_token


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    use_cache: bool = True,
) -> Iterator[torch.LongTensor]:
    """Yield the next token of every row, [batch], one step at a time.

    Every argument is checked here, before the first forward pass. `eos_token_id=None` reads the model's own end
    tokens; `[]` never stops early. Rows that have finished are padded (with the model's pad id, else its first
    end token) until every row is done, then the iterator stops. `seed` seeds the global RNG, as
    `torch.manual_seed(seed)` before `model.generate` would.
    """
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    attention_mask = check_inputs(model, input_ids, attention_mask, max_new_tokens)
    eos_ids, pad_id = stop_tokens(model, eos_token_id)
    return _decode(
        model, input_ids, attention_mask, max_new_tokens, sampling, seed, eos_ids, pad_id, use_cache
    )


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    use_cache: bool = True,
) -> torch.LongTensor:
    """The prompt followed by the new tokens, [batch, prompt + new]: what `model.generate` returns.

    Fewer than `max_new_tokens` come back when every row has reached an end token.
    """
    steps = generate_tokens(
        model,
        input_ids,
        max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        attention_mask=attention_mask,
        eos_token_id=eos_token_id,
        use_cache=use_cache,
    )
    new_tokens = [token[:, None] for token in steps]
    return torch.cat([input_ids, *new_tokens], dim=1)


def stop_tokens(model, eos_token_id: int | list[int] | None = None) -> tuple[list[int], int | None]:
    """The end tokens to stop on and the id that pads finished rows, resolved as transformers resolves them."""
    if eos_token_id is None:
        eos_token_id = (
            model.config.eos_token_ids
            if isinstance(model, Qwen2)
            else model.generation_config.eos_token_id
        )
    if eos_token_id is None:
        eos_ids = []
    elif isinstance(eos_token_id, int):
        eos_ids = [eos_token_id]
    else:
        eos_ids = [int(i) for i in eos_token_id]
    pad_id = (
        model.config.pad_token_id
        if isinstance(model, Qwen2)
        else model.generation_config.pad_token_id
    )
    if pad_id is None and eos_ids:
        pad_id = eos_ids[0]
    return eos_ids, pad_id


def check_inputs(model, input_ids, attention_mask, max_new_tokens: int) -> torch.Tensor:
    """Reject what would fail or silently mislead later; return the attention mask (all ones when none given)."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
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
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
            "they must match"
        )
    else:
        attention_mask = attention_mask.to(input_ids.device).long()
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError(
                "attention_mask has padding after real tokens (right padding); decoder-only generation needs left "
                "padding: use tokenizer(..., padding_side='left') or put the zeros first"
            )
        if (attention_mask.sum(dim=1) == 0).any():
            raise ValueError("a row of attention_mask is all padding: that prompt is empty")
    limit = model.config.max_position_embeddings
    if prompt + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = {prompt + max_new_tokens} exceeds the "
            f"model's max_position_embeddings ({limit}); shorten the prompt or ask for fewer tokens"
        )
    return attention_mask


def _last_logits(model, ids, attention_mask, positions, cache) -> torch.Tensor:
    """float32 logits of each row's last position, [batch, vocab]. `attention_mask` None means no padding."""
    if isinstance(model, Qwen2):
        logits = model(
            ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )
    else:
        logits = model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
        ).logits
    return logits[:, -1].float()


def _new_cache(model):
    if isinstance(model, Qwen2):
        return DynamicKVCache(model.config.num_hidden_layers)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def _step(model, ids, attention_mask, positions, cache, sequence, sampling, ignore_before):
    logits = _last_logits(model, ids, attention_mask, positions, cache)
    return select_next_token(process_logits(logits, sequence, sampling, ignore_before), sampling)


def _decode(
    model, input_ids, attention_mask, max_new_tokens, sampling, seed, eos_ids, pad_id, use_cache
):
    if seed is not None:
        torch.manual_seed(seed)
    device = input_ids.device
    padded = not bool(attention_mask.all())
    # Without padding the mask carries no information; leaving it out keeps attention on the plain causal path,
    # exactly as transformers' generate() does, so the floating-point results match it too.
    mask = attention_mask if padded else None
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    ignore_before = attention_mask.argmax(dim=1) if padded else None
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    cache = _new_cache(model) if use_cache else None

    sequence, step_ids, step_positions = input_ids, input_ids, positions
    for _ in range(max_new_tokens):
        next_tokens = _step(
            model, step_ids, mask, step_positions, cache, sequence, sampling, ignore_before
        )
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
