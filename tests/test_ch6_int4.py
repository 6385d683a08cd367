"""Chapter 6: weight-only int4 in groups: the rounding bound, the kernels' layout, the model, the fast engine,
`from_pretrained(quantize=...)` and the command line's `--quantize`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_checkpoint, random_prompts
from test_ch4_cli import assert_one_line_error, exit_code

import minqwen
from minqwen.engine.fast import FastQwen2
from minqwen.quant.int4 import (
    Int4Linear,
    Int4Weight,
    kernel_scales_and_zeros,
    pack,
    quantize_groupwise,
)
from minqwen.quant.weight_only import quantize


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_every_weight_is_within_half_a_step_of_its_level():
    weight = seeded(48, 128)
    weight[5, :32] = 0.25  # one constant group
    values, steps, minimums = quantize_groupwise(weight, 32)
    assert values.dtype == torch.uint8 and values.max() <= 15
    grid = (minimums[..., None] + steps[..., None] * values.float().reshape(48, 4, 32)).reshape(
        48, 128
    )
    assert ((grid - weight).abs() <= steps.repeat_interleave(32, dim=1) / 2 + 1e-6).all()
    assert grid[5, :32].eq(0.25).all()
    # every group uses its whole range: its lowest weight on level 0 and its highest on level 15
    by_group = values.reshape(48, 4, 32)
    assert (by_group.amin(-1)[steps > 1e-8] == 0).all() and (
        by_group.amax(-1)[steps > 1e-8] == 15
    ).all()


def test_the_kernels_zero_point_form_is_the_same_grid():
    values, steps, minimums = quantize_groupwise(seeded(16, 64), 32)
    scales, zeros = kernel_scales_and_zeros(steps, minimums).transpose(0, 1).unbind(-1)
    q = values.float().reshape(16, 2, 32)
    torch.testing.assert_close(
        (q - 8) * scales[..., None] + zeros[..., None], minimums[..., None] + steps[..., None] * q
    )


@pytest.mark.parametrize("rows, inputs", [(48, 96), (64, 128), (16, 256)])
def test_the_kernel_gives_back_the_values_it_was_packed_with(rows, inputs):
    values = torch.randint(
        0, 16, (rows, inputs), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    weight = Int4Weight(pack(values, torch.device("cpu")), torch.zeros(inputs // 32, rows, 2), 32)
    assert torch.equal(weight.unpacked(), values)


def test_int4_linear_is_the_product_with_its_dequantized_weight():
    linear = torch.nn.Linear(128, 48, bias=True)
    layer = Int4Linear(linear, 32)
    x = seeded(5, 7, 128, seed=2)
    exact = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    # the product runs in bfloat16: its inputs round to 8 significant bits
    assert (layer(x) - exact).abs().max() <= 2**-7 * exact.abs().max()
    # half a step, plus what rounding the stored step s and zero point z to bfloat16 moves a level by
    steps, zeros = layer.scales_and_zeros.float().transpose(0, 1).unbind(-1)
    bound = (steps / 2 + 2**-8 * (zeros.abs() + 8 * steps)).repeat_interleave(32, dim=1)
    assert ((layer.dequantized_weight() - linear.weight).abs() <= bound).all()


def test_fused_rows_are_the_rows_of_each_part():
    parts = [Int4Linear(torch.nn.Linear(64, n), 32).quantized_weight() for n in (48, 16, 16)]
    fused = Int4Weight.concat(parts)
    x = seeded(3, 64, seed=3)
    torch.testing.assert_close(fused.matmul(x), torch.cat([p.matmul(x) for p in parts], dim=-1))


@pytest.fixture(scope="module")
def tiny_int4(tiny_ours):
    return quantize(copy.deepcopy(tiny_ours), "int4", group_size=32)


def test_quantized_model_stays_close_and_generates(tiny_ours, tiny_int4):
    assert (
        sum(isinstance(m, Int4Linear) for m in tiny_int4.modules()) == 7 * len(tiny_int4.layers) + 1
    )
    ids = torch.tensor(random_prompts(4, [12, 12]))
    with torch.no_grad():
        reference, ours = tiny_ours(ids), tiny_int4(ids)
    # sixteen levels for random weights: logits within a fifth of their range (a wrong layout gives noise)
    assert (ours - reference).abs().max() < 0.2 * reference.abs().max()
    out = minqwen.generate(tiny_int4, ids, 6, do_sample=False, eos_token_id=[])
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)


def test_the_fast_engine_runs_the_quantized_model_as_the_eager_loop_does(tiny_int4):
    ids = torch.tensor(random_prompts(5, [10, 10]))
    fast = FastQwen2(tiny_int4, use_graphs=False)
    for settings in (dict(do_sample=False), dict(do_sample=True, seed=3)):
        expected = minqwen.generate(tiny_int4, ids, 8, eos_token_id=[], **settings)
        assert torch.equal(fast.generate(ids, 8, eos_token_id=[], **settings), expected)


def test_from_pretrained_quantizes_as_quantize_does(tiny_checkpoint, tiny_ours, tiny_int4):
    loaded = minqwen.Qwen2.from_pretrained(tiny_checkpoint, quantize="int4", group_size=32)
    ids = torch.tensor(random_prompts(6, [9]))
    with torch.no_grad():
        assert torch.equal(loaded(ids), tiny_int4(ids))


@pytest.mark.parametrize(
    "settings, complaint",
    [
        (dict(quantize="int3"), "unknown quantization scheme 'int3'"),
        (dict(quantize="int4", group_size=48), "group_size must be one of 32, 64, 128, 256"),
        (dict(quantize="int4", group_size=128), "layers.0.self_attn.q_proj is 64 x 64"),
        (dict(quantize="int8", group_size=32), "group_size is for int4"),
        (dict(group_size=32), "group_size goes with quantize='int4'"),
    ],
)
def test_bad_quantize_arguments_fail_before_any_weight_is_read(tmp_path, settings, complaint):
    folder = make_tiny_checkpoint(tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=complaint):
        minqwen.Qwen2.from_pretrained(folder, **settings)


def test_a_layer_moved_after_packing_says_so(tiny_int4):
    layer = copy.deepcopy(tiny_int4.layers[0].self_attn.q_proj)
    layer.packed_for = "cuda"  # what .to("cuda") after quantizing on the CPU leaves behind
    with pytest.raises(ValueError, match=r"packed for the device they were quantized on \(cuda\)"):
        layer(torch.zeros(1, 64))


def test_the_command_line_quantizes(tiny_checkpoint_with_tokenizer, capsys):
    folder = str(tiny_checkpoint_with_tokenizer)
    args = ["generate", "hi", "--raw", "--model", folder, "--max-new-tokens", "4", "--greedy"]
    assert exit_code([*args, "--quantize", "int4", "--group-size", "32"]) == 0
    assert capsys.readouterr().err == ""
    assert exit_code([*args, "--group-size", "32"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--group-size goes with --quantize int4")
    assert exit_code([*args, "--quantize", "int5"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--quantize", "int5")


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32)])
def test_a_quantized_load_holds_one_float_projection_at_a_time(
    tiny_checkpoint, monkeypatch, scheme, group_size
):
    """Each projection is quantized as soon as its tensors are read, so the float weights of the others are never
    in memory with it: when a layer is quantized, every other projection is either still empty (meta) or
    already quantized."""
    from minqwen.quant import weight_only

    seen = []
    quantize_one = weight_only.quantized

    def watching(layer, *args):
        model = seen[0] if seen else None
        float_layers = [
            m
            for m in (model.modules() if model is not None else [])
            if type(m) is torch.nn.Linear and not m.weight.is_meta
        ]
        seen.append(len(float_layers))
        return quantize_one(layer, *args)

    original_layers_to_quantize = weight_only.layers_to_quantize

    def remember_model(model, *args):
        seen.insert(0, model)
        return original_layers_to_quantize(model, *args)

    monkeypatch.setattr(weight_only, "quantized", watching)
    monkeypatch.setattr(weight_only, "layers_to_quantize", remember_model)
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint, quantize=scheme, group_size=group_size)
    counts = seen[1:]
    untied_head = not model.config.tie_word_embeddings
    assert len(counts) == 7 * len(model.layers) + untied_head and set(counts) == {1}
