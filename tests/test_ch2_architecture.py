"""Chapter 2, the architecture: the sizes table against HF-built models, the weight map, tied and untied heads."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_checkpoint
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM

import minqwen
from minqwen.model.config import ModelConfig
from minqwen.model.qwen2 import LoadError, hf_to_minqwen, minqwen_to_hf
from minqwen.model.sizes import SIZES, parameter_count, qwen25_config


def _meta_hf(size: str) -> Qwen2ForCausalLM:
    with torch.device("meta"):
        return Qwen2ForCausalLM(Qwen2Config(**qwen25_config(size)))


def _meta_ours(size: str) -> minqwen.Qwen2:
    with torch.device("meta"):
        return minqwen.Qwen2(ModelConfig.from_dict(qwen25_config(size)))


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_matches_an_hf_built_model(size):
    hf = _meta_hf(size)
    assert sum(p.numel() for p in hf.parameters()) == parameter_count(size)
    assert sum(p.numel() for p in _meta_ours(size).parameters()) == parameter_count(size)


@pytest.mark.parametrize("size", SIZES)
def test_sizes_table_reaches_hf_and_minqwen_configs_unchanged(size):
    raw = qwen25_config(size)
    hf, ours = Qwen2Config(**raw), ModelConfig.from_dict(raw)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(hf, key) == getattr(ours, key) == raw[key], key
    assert hf.rope_parameters["rope_theta"] == ours.rope_theta == 1e6
    assert (
        hf.hidden_size // hf.num_attention_heads == ours.head_dim == (64 if size == "0.5B" else 128)
    )


@pytest.mark.parametrize("size", ["0.5B", "7B"])
def test_every_hf_key_maps_to_minqwen_and_back(size):
    hf_keys = set(_meta_hf(size).state_dict())
    ours_keys = set(_meta_ours(size).state_dict())
    assert {hf_to_minqwen(k) for k in hf_keys} == ours_keys
    assert all(minqwen_to_hf(hf_to_minqwen(k)) == k for k in hf_keys)
    assert all(hf_to_minqwen(minqwen_to_hf(k)) == k for k in ours_keys)


def test_a_foreign_key_is_refused():
    with pytest.raises(LoadError, match="unexpected tensor 'transformer.h.0.attn.weight'"):
        hf_to_minqwen("transformer.h.0.attn.weight")


def test_tied_checkpoint_shares_one_matrix(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "tied", seed=5, tie_word_embeddings=True)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # a tied checkpoint stores the matrix once
    ours = minqwen.Qwen2.from_pretrained(folder)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    hf = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)


def test_untied_checkpoint_keeps_its_own_head(tiny_checkpoint, tiny_hf, tiny_ours):
    with safe_open(tiny_checkpoint / "model.safetensors", framework="pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    assert tiny_ours.lm_head.weight.data_ptr() != tiny_ours.embed_tokens.weight.data_ptr()
    assert torch.equal(tiny_ours.lm_head.weight, tiny_hf.lm_head.weight)
    assert not torch.equal(tiny_ours.lm_head.weight, tiny_ours.embed_tokens.weight)
