"""Chapter 6: weight-only int8, per output channel: the rounding bound, the layer's arithmetic, the model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_checkpoint, random_prompts

import minqwen
from minqwen.engine.fast import FastQwen2
from minqwen.quant.int8 import Int8Linear, Int8Weight, quantize_per_channel
from minqwen.quant.int8_matvec import int8_matvec
from minqwen.quant.weight_only import is_quantized, quantize


def test_every_weight_is_within_half_a_scale_of_its_int8_value():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    weight[3] = 0.0
    values, scales = quantize_per_channel(weight)
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    assert scales[3] == 1 and (values[3] == 0).all()
    error = (values.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert (values.abs().amax(dim=1)[scales != 1] == 127).all()


def test_int8_linear_is_the_product_with_its_dequantized_weight():
    linear = torch.nn.Linear(96, 64, bias=True)
    layer = Int8Linear(linear)
    x = torch.randn(5, 7, 96, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.linear(
        x.double(), layer.dequantized_weight().double(), linear.bias.double()
    )
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_on_the_cpu_uses_the_packed_kernel_and_agrees():
    layer = Int8Linear(torch.nn.Linear(256, 128, bias=False))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    ours = layer(x.bfloat16()).float()
    exact = x @ layer.dequantized_weight().T
    assert (ours - exact).abs().max() <= 2**-7 * exact.abs().max()


def test_quantized_model_stays_close_and_generates(tiny_ours):
    model = quantize(copy.deepcopy(tiny_ours))
    assert is_quantized(model) and not is_quantized(tiny_ours)
    projections = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(projections) == 7 * len(model.layers) + 1  # and the untied head
    ids = torch.tensor(random_prompts(4, [12, 12]))
    with torch.no_grad():
        reference, ours = tiny_ours(ids).float(), model(ids).float()
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
    out = minqwen.generate(model, ids, 6, do_sample=False, eos_token_id=[])
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)


def test_a_tied_head_is_left_alone(tmp_path):
    model = quantize(
        minqwen.Qwen2.from_pretrained(make_tiny_checkpoint(tmp_path, tie_word_embeddings=True))
    )
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize(
    "call, complaint",
    [
        (lambda m: quantize(m, "int3"), "unknown quantization scheme 'int3'; choose from int8"),
        (lambda m: quantize(torch.nn.Linear(2, 2)), "quantize takes a minqwen Qwen2, got Linear"),
        (lambda m: quantize(quantize(m)), "already quantized"),
        (lambda m: quantize(m, "int8", group_size=32), "group_size is for int4"),
    ],
)
def test_bad_use_is_one_clear_error(tiny_ours, call, complaint):
    with pytest.raises(ValueError, match=complaint):
        call(copy.deepcopy(tiny_ours))


def test_the_fast_engine_runs_the_quantized_model_as_the_eager_loop_does(tiny_ours):
    model = quantize(copy.deepcopy(tiny_ours))
    ids = torch.tensor(random_prompts(5, [10, 10]))
    fast = FastQwen2(model, use_graphs=False)
    for settings in (dict(do_sample=False), dict(do_sample=True, seed=3)):
        expected = minqwen.generate(model, ids, 8, eos_token_id=[], **settings)
        assert torch.equal(fast.generate(ids, 8, eos_token_id=[], **settings), expected)


def test_fused_rows_are_the_rows_of_each_part():
    parts = [Int8Linear(torch.nn.Linear(32, n)).quantized_weight() for n in (16, 8, 8)]
    fused = Int8Weight.concat(parts)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fused.matmul(x), torch.cat([p.matmul(x) for p in parts], dim=-1))


@pytest.mark.parametrize("rows, out_features, in_features", [(1, 40, 600), (3, 16, 1024)])
def test_the_decode_kernel_is_the_product_with_the_dequantized_weight(
    rows, out_features, in_features
):
    """The Triton kernel of minqwen.quant.int8_matvec, in Triton's interpreter without a GPU."""
    layer = Int8Linear(torch.nn.Linear(in_features, out_features, bias=False))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(5))
    ours = int8_matvec(x, layer.weight_int8, layer.scales)
    exact = x.double() @ layer.dequantized_weight().double().T
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


def test_quantizing_in_slices_of_rows_changes_nothing(monkeypatch):
    """Rows are quantized a slice at a time to bound the temporaries; the result is the whole matrix's, bit for
    bit, also when the last slice is short."""
    from minqwen.quant import int4, int8

    weight = torch.randn(70, 64, generator=torch.Generator().manual_seed(5))
    whole = int8.quantize_per_channel(weight), int4.quantize_groupwise(weight, 32)
    monkeypatch.setattr(int8, "ROWS_PER_SLICE", 16)
    monkeypatch.setattr(int4, "ROWS_PER_SLICE", 16)
    sliced = int8.quantize_per_channel(weight), int4.quantize_groupwise(weight, 32)
    for expected, got in zip(whole, sliced):
        assert all(torch.equal(e, g) for e, g in zip(expected, got))
