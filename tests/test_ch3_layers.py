"""RMSNorm, SwiGLU MLP, attention and the decoder layer, each against its transformers twin on shared weights."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_hf_config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

from minqwen.model.config import ModelConfig
from minqwen.model.layers import MLP, Attention, DecoderLayer, RMSNorm
from minqwen.model.rope import rope_cos_sin, rope_inv_freq


def configs(**overrides):
    hf = tiny_hf_config(**overrides)
    hf._attn_implementation = "eager"
    return hf, ModelConfig.from_dict(hf.to_dict())


def twin(ours: torch.nn.Module, reference: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours.load_state_dict(reference.state_dict())
    return ours.eval()


def test_rmsnorm_matches_in_float32_and_bfloat16():
    reference = Qwen2RMSNorm(64, eps=1e-6)
    ours = twin(RMSNorm(64, 1e-6), reference)
    x = torch.randn(2, 5, 64) * 30
    assert torch.equal(ours(x), reference(x))
    assert torch.equal(ours.bfloat16()(x.bfloat16()), reference.bfloat16()(x.bfloat16()))


def test_rmsnorm_upcast_beats_bfloat16_arithmetic():
    torch.manual_seed(0)
    x = (torch.randn(8, 896) * torch.logspace(-2, 2, 896)).bfloat16()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    upcast = RMSNorm(896, 1e-6).bfloat16()(x)
    naive = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (upcast.double() - exact).abs().max() <= (naive.double() - exact).abs().max()


def test_mlp_matches():
    hf, ours_config = configs()
    reference = Qwen2MLP(hf)
    ours = twin(MLP(ours_config), reference)
    x = torch.randn(2, 5, 64)
    assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_attention_and_layer_match_for_every_gqa_ratio(heads, kv_heads):
    hf, ours_config = configs(num_attention_heads=heads, num_key_value_heads=kv_heads)
    x = torch.randn(2, 6, 64)
    positions = torch.arange(6).expand(2, -1)
    cos, sin = rope_cos_sin(rope_inv_freq(ours_config)[0], positions)
    assert torch.equal(cos, Qwen2RotaryEmbedding(hf)(x, positions)[0])
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]

    reference_attention = Qwen2Attention(hf, layer_idx=0).eval()
    ours_attention = twin(Attention(ours_config, 0), reference_attention)
    expected, _ = reference_attention(x, (cos, sin), causal)
    torch.testing.assert_close(ours_attention(x, cos, sin, None), expected, rtol=1e-5, atol=1e-6)

    reference_layer = Qwen2DecoderLayer(hf, layer_idx=0).eval()
    ours_layer = twin(DecoderLayer(ours_config, 0), reference_layer)
    expected = reference_layer(x, attention_mask=causal, position_embeddings=(cos, sin))
    torch.testing.assert_close(ours_layer(x, cos, sin, None), expected, rtol=1e-5, atol=1e-5)


def test_kv_heads_broadcast_by_repeat_interleave():
    """Query heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1 (`repeat` would interleave them instead)."""
    hf, ours_config = configs(num_attention_heads=4, num_key_value_heads=2)
    attention = twin(Attention(ours_config, 0), Qwen2Attention(hf, 0))
    head_dim = ours_config.head_dim
    with torch.no_grad():
        attention.o_proj.weight.copy_(torch.eye(64))  # the output is then the heads side by side
    x = torch.randn(1, 3, 64)
    cos, sin = rope_cos_sin(rope_inv_freq(ours_config)[0], torch.arange(3)[None])
    before = attention(x, cos, sin, None).detach()
    with torch.no_grad():
        attention.v_proj.bias[head_dim:] += 1.0  # change kv head 1 only
    changed = (
        (attention(x, cos, sin, None).detach() - before)
        .abs()
        .view(1, 3, 4, head_dim)
        .amax(dim=(0, 1, 3))
    )
    assert changed[:2].max() == 0 and changed[2:].min() > 0.5
