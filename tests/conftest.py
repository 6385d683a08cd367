"""Shared fixtures and helpers: tiny random Qwen2 checkpoints for exact checks, the embedded model for end-to-end
ones. Every test that uses an `embedded_*` fixture is marked `embedded`, so `pytest -m "not embedded"` runs
without fetching the real model."""

from __future__ import annotations

import json
import os

import pytest
import torch

# Without a GPU, Triton kernels (chapter 5) run in Triton's interpreter on CPU tensors; it is chosen when a kernel
# is defined, so before minqwen's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
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


# generation_config.json of an Instruct model, scaled to the tiny vocabulary: sampling on, two end tokens, and a
# pad id that is neither of them, so padding mistakes show.
TINY_INSTRUCT_GENERATION = {
    "bos_token_id": 1,
    "pad_token_id": 0,
    "eos_token_id": [7, 2],
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.05,
}


def pytest_collection_modifyitems(items):
    for item in items:
        if any(name.startswith("embedded") for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.embedded)


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of `prompts`, left-padded to the longest."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_generate(model, ids, max_new_tokens, seed=0, mask=None, **kwargs):
    """HF generate() called the way a user calls it: what is passed, the rest from the checkpoint."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        mask = torch.ones_like(ids) if mask is None else mask
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)


def random_prompts(seed: int, lengths) -> list[list[int]]:
    """Prompts of the given lengths, of ids 3..127 (0-2 are the tiny models' special ids)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]


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
def tiny_instruct_checkpoint(tmp_path_factory):
    """A tiny model with an Instruct-style generation_config.json (see TINY_INSTRUCT_GENERATION)."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-instruct"), seed=1)
    (folder / "generation_config.json").write_text(json.dumps(TINY_INSTRUCT_GENERATION))
    return folder


@pytest.fixture(scope="session")
def tiny_instruct_hf(tiny_instruct_checkpoint):
    return Qwen2ForCausalLM.from_pretrained(tiny_instruct_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_instruct_ours(tiny_instruct_checkpoint):
    return minqwen.Qwen2.from_pretrained(tiny_instruct_checkpoint)


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
