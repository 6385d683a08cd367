"""Chapter 5, prefill: the fast engine's chunked prefill fills the cache as one pass over the prompt would.

A chunk's queries attend to every earlier key and causally to the chunk's own, with the kv heads shared inside
SDPA (`enable_gqa`) rather than copied per query head. On the CPU in float32 the cache it leaves must match the eager
model's to rounding, at every chunk size, with and without left padding, and the tokens that follow must be equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import left_pad, random_prompts

import minqwen
from minqwen.engine.fast import (
    PREFILL_GRANULE,
    FastQwen2,
    cudnn_attention,
    prefill_attention,
    prefill_length,
)
from minqwen.engine.request import prepare

GREEDY = dict(do_sample=False, eos_token_id=[])


def reference_attention(q, keys, values, padding=None):
    """float64 softmax(q k^T / sqrt(d)) v, each kv head repeated for its query heads; query i of the chunk sits at
    position end - seq + i and sees keys up to it (and, with `padding` [batch, end], only real ones)."""
    q, keys, values = q.double(), keys.double(), values.double()
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    seq, end = q.shape[2], keys.shape[2]
    allowed = torch.arange(end)[None, :] <= torch.arange(end - seq, end)[:, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :].bool()
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values


@pytest.mark.parametrize("seq,end", [(5, 5), (3, 11), (1, 9), (8, 24)])
def test_prefill_attention_is_causal_at_the_bottom_right(seq, end):
    g = torch.Generator().manual_seed(seq * 100 + end)
    q = torch.randn(2, 6, seq, 16, generator=g)
    keys, values = torch.randn(2, 2, end, 16, generator=g), torch.randn(2, 2, end, 16, generator=g)
    out = prefill_attention(q, keys, values, None)
    assert (out.double() - reference_attention(q, keys, values)).abs().max() < 1e-5


def test_prefill_attention_with_a_padding_mask():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 4, 8, generator=g)
    keys, values = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, :3] = 0
    mask = minqwen.Qwen2.attention_mask(4, 6, padding, q.device)
    out = prefill_attention(q, keys, values, mask)
    assert (out.double() - reference_attention(q, keys, values, padding)).abs().max() < 1e-5


def cache_after_prefill(fast: FastQwen2, ids, mask=None):
    """Each layer's keys and values [batch, kv_heads, prompt, head_dim] as the fast engine's prefill left them."""
    state = fast._start(prepare(fast.config, ids, 1, attention_mask=mask, **GREEDY))
    prompt = ids.shape[1]
    return [k[:, :, :prompt] for k in state.keys], [v[:, :, :prompt] for v in state.values]


def eager_cache(model, ids, mask=None):
    cache = model.new_cache()
    model(ids, attention_mask=mask, cache=cache)
    return cache.keys, cache.values


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 37, 64])
def test_chunked_prefill_fills_the_cache_as_one_pass(tiny_ours, chunk):
    ids = torch.tensor(random_prompts(2, [37, 37]))
    keys, values = cache_after_prefill(FastQwen2(tiny_ours, bucket=16, prefill_chunk=chunk), ids)
    want_keys, want_values = eager_cache(tiny_ours, ids)
    for layer, (k, v) in enumerate(zip(keys, values)):
        assert torch.allclose(k, want_keys[layer], atol=1e-5), layer
        assert torch.allclose(v, want_values[layer], atol=1e-5), layer


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_chunked_prefill_of_a_left_padded_batch(tiny_ours, chunk):
    ids, mask = left_pad(random_prompts(9, [19, 7, 13]))
    keys, values = cache_after_prefill(
        FastQwen2(tiny_ours, bucket=16, prefill_chunk=chunk), ids, mask
    )
    want_keys, want_values = eager_cache(tiny_ours, ids, mask)
    real = mask.bool()[:, None, :, None]
    for layer, (k, v) in enumerate(zip(keys, values)):
        assert torch.allclose(k * real, want_keys[layer] * real, atol=1e-5), layer
        assert torch.allclose(v * real, want_values[layer] * real, atol=1e-5), layer
    eager = minqwen.generate(tiny_ours, ids, 12, attention_mask=mask, **GREEDY)
    fast = FastQwen2(tiny_ours, bucket=16, prefill_chunk=chunk)
    assert torch.equal(fast.generate(ids, 12, attention_mask=mask, **GREEDY), eager)


@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_chunked_prefill_tokens_equal_eager(tiny_ours, chunk):
    ids = torch.tensor(random_prompts(4, [40]))
    for settings in (GREEDY, dict(do_sample=True, seed=2, eos_token_id=[])):
        eager = minqwen.generate(tiny_ours, ids, 16, **settings)
        fast = FastQwen2(tiny_ours, bucket=16, prefill_chunk=chunk)
        assert torch.equal(fast.generate(ids, 16, **settings), eager), settings


def test_embedded_model_prefilled_in_chunks_equals_eager(embedded_ours):
    """The real model: a 45-token prompt in chunks of 16 gives the eager loop's greedy tokens."""
    ids = torch.tensor(random_prompts(11, [45]))
    eager = minqwen.generate(embedded_ours, ids, 8, **GREEDY)
    fast = FastQwen2(embedded_ours, prefill_chunk=16)
    assert torch.equal(fast.generate(ids, 8, **GREEDY), eager)


@pytest.mark.parametrize("scheme, settings", [("int8", {}), ("int4", {"group_size": 32})])
def test_quantized_model_prefilled_in_chunks_equals_eager(tiny_ours, scheme, settings):
    """Chunks of a quantized model read the same quantized weights as one pass: on the GPU an int8 run in chunks
    of 128 parted from the eager loop after 3 tokens (bf16, random weights, near ties); here it must not."""
    model = minqwen.quantize(copy.deepcopy(tiny_ours), scheme, **settings)
    ids = torch.tensor(random_prompts(12, [37, 37]))
    eager = minqwen.generate(model, ids, 10, **GREEDY)
    for chunk in (4, 16):
        fast = FastQwen2(model, bucket=16, prefill_chunk=chunk)
        assert torch.equal(fast.generate(ids, 10, **GREEDY), eager), chunk


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True, "512"])
def test_bad_prefill_chunk_is_refused(tiny_ours, chunk):
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        FastQwen2(tiny_ours, prefill_chunk=chunk)


def test_float32_chunks_on_cuda_do_not_go_to_cudnn():
    """cuDNN's attention op, called directly, does not refuse float32, which it lacks: float32 chunks take the
    bottom-right mask instead. Decided before any CUDA query, so it is checked here without a GPU."""
    assert not cudnn_attention(torch.device("cuda"), torch.float32)


def test_a_captured_prefill_pads_a_prompt_by_under_a_quarter():
    """The graph computes its padding like real tokens, so from four granules on it pads by under 25%, with
    at most four lengths per octave (each length is a graph to capture and keep), and never past the cache."""
    lengths = {prefill_length(prompt, 4096) for prompt in range(1, 2049)}
    for prompt in range(1, 2049):
        length = prefill_length(prompt, 4096)
        assert prompt <= length and length % PREFILL_GRANULE == 0
        if prompt >= 4 * PREFILL_GRANULE:
            assert length < 1.25 * prompt
    for low in (128, 256, 512, 1024):
        assert len([n for n in lengths if low < n <= 2 * low]) <= 4
    assert prefill_length(128, 256) == 128 and prefill_length(300, 320) == 320
