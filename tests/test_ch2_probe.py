"""Chapter 2, the layer probe: record HF modules, replay them on minqwen, localise a disagreement."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_checkpoint
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2ForCausalLM

import minqwen
from minqwen.tools.probe import (
    ProbeError,
    capture_outputs,
    compare_layers,
    first_divergence,
    format_table,
    load_recording,
    record,
    replay,
)

LAYER_AND_PARTS = [
    "model.embed_tokens",
    "model.layers.0",
    "model.layers.1",
    "model.layers.1.self_attn",
    "model.layers.1.mlp",
    "model.layers.0.input_layernorm",
    "model.norm",
    "lm_head",
]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A 4-layer tiny checkpoint, so a perturbed layer sits between unperturbed ones."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("four"), seed=3, num_hidden_layers=4)
    hf = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, minqwen.Qwen2.from_pretrained(folder)


def _ids(batch=2, seq=7, seed=1):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_record_keeps_inputs_and_outputs(tiny_hf, tmp_path):
    path = record(
        tiny_hf, "model.layers.0", tmp_path / "layer0.safetensors", _ids(), use_cache=False
    )
    rec = load_recording(path)["model.layers.0"]
    assert rec.kind == "Qwen2DecoderLayer"
    hidden = rec.args[0]
    cos, sin = rec.kwargs["position_embeddings"]
    assert hidden.shape == (2, 7, 64) and cos.shape == sin.shape == (1, 7, 16)
    assert rec.kwargs["attention_mask"] is None and rec.kwargs["use_cache"] is False
    with torch.no_grad():
        again = tiny_hf.model.layers[0](hidden, position_embeddings=(cos, sin), attention_mask=None)
    assert torch.equal(again, rec.output)


def test_replay_of_identical_weights_is_exact(tiny_hf, tiny_ours, tmp_path):
    path = record(tiny_hf, LAYER_AND_PARTS, tmp_path / "parts.safetensors", _ids())
    rows = replay(path, tiny_ours)
    assert [r.hf for r in rows] == LAYER_AND_PARTS
    assert [r.minqwen for r in rows] == [name.removeprefix("model.") for name in LAYER_AND_PARTS]
    assert all(r.max_abs == 0.0 for r in rows), format_table(rows)


def test_replay_with_padding_skips_only_padding_queries(tiny_checkpoint, tiny_ours, tmp_path):
    # eager HF and SDPA disagree on padding queries (no key to attend to); real tokens must still agree
    eager = Qwen2ForCausalLM.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    path = record(
        eager,
        ["model.layers.0", "model.layers.1.self_attn"],
        tmp_path / "pad.safetensors",
        _ids(),
        attention_mask=mask,
        use_cache=False,
    )
    rows = replay(path, tiny_ours)
    assert [r.shape for r in rows] == [(12, 64), (12, 64)]  # 14 positions, 2 of them padding
    assert all(r.max_rel < 1e-6 for r in rows), format_table(rows)


def test_replay_a_bare_layer(tiny_hf, tiny_ours, tmp_path):
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = tiny_hf.model.rotary_emb(hidden, torch.arange(5)[None])
    path = record(
        tiny_hf.model.layers[1],
        "",
        tmp_path / "bare.safetensors",
        hidden,
        position_embeddings=(cos, sin),
    )
    (row,) = replay(path, tiny_ours.layers[1])
    assert row.max_abs == 0.0
    (row,) = replay(path, tiny_ours, names={"": "layers.1"})
    assert row.max_abs == 0.0


def test_perturbed_layer_is_localised(four_layers, tmp_path):
    hf, ours = four_layers
    broken = copy.deepcopy(ours)
    with torch.no_grad():
        broken.layers[2].mlp.down_proj.weight[0, 0] += 0.5
    names = [f"model.layers.{i}" for i in range(4)]
    rows = replay(record(hf, names, tmp_path / "all.safetensors", _ids()), broken)
    assert [r.max_abs > 0 for r in rows] == [
        False,
        False,
        True,
        False,
    ]  # replay isolates layers from each other
    rows = compare_layers(hf, broken, _ids())
    assert first_divergence(rows, 1e-6).minqwen == "layers.2"
    assert all(
        r.max_rel > 1e-6 for r in rows[rows.index(first_divergence(rows, 1e-6)) :]
    )  # and it propagates
    clean = compare_layers(hf, ours, _ids())
    assert first_divergence(clean, 1e-6) is None, format_table(clean)


def test_compare_layers_rows_and_padding(tiny_hf, tiny_ours):
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    rows = compare_layers(tiny_hf, tiny_ours, _ids(), attention_mask=mask)
    assert [r.minqwen for r in rows] == ["embed_tokens", "layers.0", "layers.1", "norm", "lm_head"]
    assert rows[0].shape == (13, 64) and rows[-1].shape == (13, 128)
    assert first_divergence(rows, 1e-5) is None, format_table(rows)


def test_capture_outputs_takes_first_of_tuple(tiny_hf):
    outputs = capture_outputs(
        tiny_hf, ["model.layers.0.self_attn", "model.norm"], _ids(), use_cache=False
    )
    assert outputs["model.layers.0.self_attn"].shape == (2, 7, 64) and outputs[
        "model.norm"
    ].shape == (2, 7, 64)


def test_format_table_lists_every_row(tiny_hf, tiny_ours):
    text = format_table(compare_layers(tiny_hf, tiny_ours, _ids()))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["HF", "module"] and len(lines) == 6
    assert lines[2].split()[:3] == ["model.layers.0", "layers.0", "2x7x64"]


# --- bad input -------------------------------------------------------------------------------------------------


def test_unknown_module_is_named_with_suggestions(tiny_hf, tmp_path):
    with pytest.raises(
        ProbeError, match=r"no module named 'model.layer.0'.*did you mean model.layers.0"
    ):
        record(tiny_hf, "model.layer.0", tmp_path / "x.safetensors", _ids())
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ProbeError, match="at least one module"):
        record(tiny_hf, [], tmp_path / "x.safetensors", _ids())


def test_missing_and_foreign_files(tiny_ours, tmp_path):
    with pytest.raises(ProbeError, match="does not exist"):
        replay(tmp_path / "nowhere.safetensors", tiny_ours)
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ProbeError, match="not a probe recording"):
        load_recording(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ProbeError, match="not a readable safetensors file"):
        load_recording(tmp_path / "junk.safetensors")


def test_shape_mismatch_is_caught_before_running(tiny_hf, tmp_path):
    folder = make_tiny_checkpoint(
        tmp_path / "narrow", hidden_size=32, num_attention_heads=4, num_key_value_heads=2
    )
    narrow = minqwen.Qwen2.from_pretrained(folder)
    path = record(
        tiny_hf, ["model.layers.0", "model.layers.0.mlp"], tmp_path / "wide.safetensors", _ids()
    )
    with pytest.raises(
        ProbeError, match="hidden_states has last dimension 64, but minqwen's layers.0 expects 32"
    ):
        replay(path, narrow)


def test_unknown_target_and_wrong_kind(tiny_hf, tiny_ours, four_layers, tmp_path):
    path = record(tiny_hf, "model.layers.0", tmp_path / "l0.safetensors", _ids())
    with pytest.raises(
        ProbeError, match="is a Qwen2DecoderLayer but minqwen's 'layers.0.mlp' is a MLP"
    ):
        replay(path, tiny_ours, names={"model.layers.0": "layers.0.mlp"})
    with pytest.raises(ProbeError, match="no module named 'layers.9'"):
        replay(path, tiny_ours, names={"model.layers.0": "layers.9"})
    rotary = record(tiny_hf, "model.rotary_emb", tmp_path / "rope.safetensors", _ids())
    with pytest.raises(ProbeError, match="Qwen2RotaryEmbedding; replay supports"):
        replay(rotary, tiny_ours)
    with pytest.raises(ProbeError, match="2 decoder layers and minqwen's 4"):
        compare_layers(tiny_hf, four_layers[1], _ids())
    with pytest.raises(ProbeError, match=r"input_ids must be \[batch, seq\]"):
        compare_layers(tiny_hf, tiny_ours, _ids()[0])


def test_recording_with_a_filled_cache_is_refused(tiny_hf, tiny_ours, tmp_path):
    ids = _ids()
    with torch.no_grad():
        past = tiny_hf(ids[:, :5], use_cache=True).past_key_values
    path = record(
        tiny_hf,
        "model.layers.1",
        tmp_path / "decode.safetensors",
        ids[:, 5:],
        past_key_values=past,
        use_cache=True,
    )
    with pytest.raises(ProbeError, match="recorded with 5 cached positions"):
        replay(path, tiny_ours)


def test_a_module_called_twice_is_refused(tmp_path):
    shared = nn.Linear(4, 4)
    with pytest.raises(ProbeError, match="ran 2 times"):
        record(
            nn.Sequential(shared, shared), "0", tmp_path / "twice.safetensors", torch.zeros(1, 4)
        )
