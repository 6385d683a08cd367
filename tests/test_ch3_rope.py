"""RoPE: minqwen's frequencies and cos/sin tables against transformers', plain and YaRN, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from minqwen.model.config import ModelConfig
from minqwen.model.rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_half

QWEN_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
)
QWEN_CARD_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def both_configs(tmp_path, **overrides) -> tuple[Qwen2Config, ModelConfig]:
    """The same config.json read by transformers and by minqwen (round-tripped, as a checkpoint would be)."""
    Qwen2Config(**{**QWEN_05B, **overrides}).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    return Qwen2Config.from_pretrained(tmp_path), ModelConfig.from_dict(raw)


def test_default_tables_are_bit_identical(tmp_path):
    hf_config, ours = both_configs(tmp_path)
    rotary = Qwen2RotaryEmbedding(hf_config)
    inv_freq, scale = rope_inv_freq(ours)
    assert torch.equal(inv_freq, rotary.inv_freq) and scale == rotary.attention_scaling == 1.0
    positions = torch.arange(4096)[None]
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin(inv_freq, positions)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


YARN_VARIANTS = {
    "qwen2.5 model card": dict(rope_scaling=QWEN_CARD_YARN),
    "extended max positions": dict(max_position_embeddings=131072, rope_scaling=QWEN_CARD_YARN),
    "factor derived from lengths": dict(
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "yarn",
            "factor": None,
            "original_max_position_embeddings": 32768,
        },
    ),
    "original length defaults to max": dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
    "no truncation": dict(rope_scaling={**QWEN_CARD_YARN, "truncate": False}),
    "explicit attention factor": dict(rope_scaling={**QWEN_CARD_YARN, "attention_factor": 1.5}),
    "mscale ratio": dict(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
    ),
    "custom betas": dict(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 16,
            "beta_slow": 2,
        },
    ),
    "top-level original length wins": dict(
        original_max_position_embeddings=8192, rope_scaling=QWEN_CARD_YARN
    ),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("overrides", YARN_VARIANTS.values(), ids=YARN_VARIANTS.keys())
def test_yarn_matches_transformers(tmp_path, overrides):
    hf_config, ours = both_configs(tmp_path, **overrides)
    reference, reference_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    inv_freq, scale = rope_inv_freq(ours)
    assert ours.rope_type == "yarn"
    assert torch.equal(inv_freq, reference)
    assert scale == reference_scale


def test_yarn_cos_sin_carry_the_attention_scale(tmp_path):
    hf_config, ours = both_configs(tmp_path, rope_scaling=QWEN_CARD_YARN)
    positions = torch.arange(0, 131072, 997)[None]
    hf_cos, hf_sin = Qwen2RotaryEmbedding(hf_config)(torch.zeros(1), positions)
    inv_freq, scale = rope_inv_freq(ours)
    cos, sin = rope_cos_sin(inv_freq, positions, scale)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    assert cos.abs().max() > 1.0  # the YaRN scale multiplies the table itself


def test_rotation_matches_transformers_and_keeps_norms():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 64), torch.randn(2, 2, 7, 64)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    cos, sin = rope_cos_sin(inv_freq, torch.arange(3, 10).expand(2, -1))
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), hf_q) and torch.equal(apply_rope(k, cos, sin), hf_k)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(rotate_half(rotate_half(q)), -q)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 64, 2).float() / 64))

    def score(query_position: int, key_position: int) -> float:
        cos_q, sin_q = rope_cos_sin(inv_freq, torch.tensor([[query_position]]))
        cos_k, sin_k = rope_cos_sin(inv_freq, torch.tensor([[key_position]]))
        return (apply_rope(q, cos_q, sin_q) * apply_rope(k, cos_k, sin_k)).sum().item()

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-5)
