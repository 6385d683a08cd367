"""Shared fixtures: tiny random Qwen2 checkpoints for exact checks, the embedded model for end-to-end ones."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import minqwen


def tiny_hf_config(**overrides) -> Qwen2Config:
    """A Qwen2 small enough to run in milliseconds, with GQA (4 query heads per 2 kv heads) and untied head."""
    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return Qwen2Config(**values)


def make_tiny_checkpoint(folder, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_hf_config(**overrides)).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_hf(tiny_checkpoint):
    return Qwen2ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_ours(tiny_checkpoint):
    return minqwen.Qwen2.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def embedded_path():
    return minqwen.fetch("embedded")


@pytest.fixture(scope="session")
def embedded_hf(embedded_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embedded_ours(embedded_path):
    return minqwen.Qwen2.from_pretrained(embedded_path)


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


@pytest.fixture(scope="session")
def tiny_checkpoint_with_tokenizer(tmp_path_factory):
    """A tiny random model with Qwen2.5's real vocabulary, tokenizer and end tokens, for text-level tests."""
    import shutil

    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-vocab"),
        vocab_size=151936,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    for file in minqwen.weights.ASSETS.iterdir():
        shutil.copy(file, folder / file.name)
    return folder
