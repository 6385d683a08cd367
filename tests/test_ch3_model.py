"""The whole model: minqwen.Qwen2 against transformers' Qwen2ForCausalLM, and every way a checkpoint can fail to load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_checkpoint
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

import minqwen
from minqwen import ConfigError, LoadError
from minqwen.model.cache import DynamicKVCache
from minqwen.model.qwen2 import positions_from_mask

TINY_VARIANTS = {
    "gqa 2:1": {},
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "mqa": dict(num_attention_heads=8, num_key_value_heads=1),
    "tied head": dict(tie_word_embeddings=True),
    "yarn": dict(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ),
    "yarn no truncation": dict(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 128,
            "truncate": False,
        }
    ),
}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("overrides", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_tiny_logits_match(tmp_path, overrides):
    make_tiny_checkpoint(tmp_path, seed=1, **overrides)
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = minqwen.Qwen2.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, logits = reference(ids).logits, ours(ids)
    assert logits.shape == (2, 200, 128)
    assert relative_error(logits, expected) <= 1e-5
    if overrides.get("tie_word_embeddings"):
        assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()


def test_left_padded_batch_matches_each_prompt_alone(tiny_ours, tiny_hf):
    prompts = [[5, 17, 9, 33, 41, 7], [12, 8, 90]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched = tiny_ours(ids, attention_mask=mask)
        reference = tiny_hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        for row, prompt in enumerate(prompts):
            alone = tiny_ours(torch.tensor([prompt]))[0]
            real = batched[row, width - len(prompt) :]
            torch.testing.assert_close(real, alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                real, reference[row, width - len(prompt) :], rtol=1e-5, atol=1e-5
            )


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_cached_decoding_matches_full_forward(tiny_ours):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    cache = DynamicKVCache(tiny_ours.config.num_hidden_layers)
    with torch.no_grad():
        full = tiny_ours(ids)
        steps = [tiny_ours(ids[:, :8], cache=cache, logits_to_keep=1)]
        steps += [tiny_ours(ids[:, i : i + 1], cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], rtol=1e-5, atol=1e-5)


def test_casting_keeps_rope_frequencies_in_float32(tiny_checkpoint, tiny_hf):
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint).bfloat16()
    assert (
        model.inv_freq.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    )
    assert torch.equal(model.inv_freq, tiny_hf.model.rotary_emb.inv_freq)
    loaded = minqwen.Qwen2.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


# --- loading failures: each names what is wrong ---


def edit_tensors(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(folder, edit) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.fixture
def checkpoint(tmp_path):
    return make_tiny_checkpoint(tmp_path)


def test_missing_tensor(checkpoint):
    edit_tensors(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError, match=r"missing 1 tensor\(s\): layers\.1\.mlp\.up_proj\.weight"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_unexpected_tensor(checkpoint):
    edit_tensors(
        checkpoint, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)})
    )
    with pytest.raises(
        LoadError, match=r"unexpected 1 tensor\(s\): layers\.2\.mlp\.up_proj\.weight"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_tensor_outside_the_qwen2_naming(checkpoint):
    edit_tensors(checkpoint, lambda t: t.update({"vision.proj.weight": torch.zeros(2)}))
    with pytest.raises(LoadError, match=r"unexpected tensor 'vision\.proj\.weight'"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_wrong_shape(checkpoint):
    edit_tensors(checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(
        LoadError, match=r"1 shape mismatch\(es\): norm\.weight: file \(65,\) vs config \(64,\)"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_no_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"holds no \*\.safetensors file"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json does not exist"):
        minqwen.Qwen2.from_pretrained(tmp_path)


def test_sliding_window(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(use_sliding_window=True, sliding_window=32))
    with pytest.raises(
        ConfigError, match=r"use_sliding_window=true; minqwen implements full attention only"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_sliding_layer_types(checkpoint):
    edit_config(
        checkpoint, lambda raw: raw.update(layer_types=["full_attention", "sliding_attention"])
    )
    with pytest.raises(ConfigError, match=r"layer_types \['sliding_attention'\]"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_unknown_rope_type(checkpoint):
    edit_config(
        checkpoint,
        lambda raw: raw.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
    )
    with pytest.raises(ConfigError, match=r"rope type 'llama3'; minqwen supports default, yarn"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_missing_rope_theta(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(rope_parameters={"rope_type": "default"}))
    with pytest.raises(ConfigError, match=r"sets no rope_theta .*; Qwen2\.5 uses 1000000\.0"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_yarn_factor_below_one(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(rope_scaling={"type": "yarn", "factor": 0.5}))
    with pytest.raises(ConfigError, match=r"YaRN factor 0\.5 is below 1"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_missing_config_keys(checkpoint):
    edit_config(checkpoint, lambda raw: [raw.pop("num_key_value_heads"), raw.pop("rms_norm_eps")])
    with pytest.raises(
        ConfigError, match=r"lacks num_key_value_heads, rms_norm_eps; a Qwen2 config\.json needs"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_other_model_type(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(model_type="llama"))
    with pytest.raises(ConfigError, match=r"model_type 'llama'; minqwen runs Qwen2"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_indivisible_heads(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(num_key_value_heads=3))
    with pytest.raises(
        ConfigError, match=r"num_attention_heads a multiple of num_key_value_heads 3"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_explicit_head_dim(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(head_dim=32))
    with pytest.raises(ConfigError, match=r"head_dim=32, but minqwen derives head_dim as .* = 16"):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_other_activation(checkpoint):
    edit_config(checkpoint, lambda raw: raw.update(hidden_act="gelu"))
    with pytest.raises(ConfigError, match=r"hidden_act='gelu'"):
        minqwen.Qwen2.from_pretrained(checkpoint)


# --- the real embedded model, on prompts the book does not use ---

UNSEEN_PROMPT = "-- SQL: the ten customers with the highest total order value in 2023\nSELECT"


def test_embedded_logits_and_greedy_tokens_match(embedded_hf, embedded_ours, embedded_tokenizer):
    ids = embedded_tokenizer(UNSEEN_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert relative_error(embedded_ours(ids), embedded_hf(ids).logits) <= 1e-5
        # do_sample=False alone: greedy, with the checkpoint's repetition penalty of 1.05, in both.
        expected = embedded_hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
    ours = minqwen.generate(embedded_ours, ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, expected)
