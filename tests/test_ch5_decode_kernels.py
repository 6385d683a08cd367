"""Chapter 5: one row's decode layer in six hand-written kernels computes the eager layer, to float32 rounding.

Without a GPU the Triton kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), on float32 CPU
tensors. Checked here:

- the whole layer (`decode_kernels.decode_layer`) against the fast engine's eager layer math
  (`minqwen.engine.fast.decode_layer`): its output, and the cache, whose key and value must land at the current
  slot (not slot 0) and nowhere else. The weights are random, the qkv bias included: a checkpoint's biases start
  at zero, which would hide a kernel that drops or misplaces them. Several shapes (query heads per kv head 2, 4
  and 5; head_dim 16 and 32) and several tiles: one or many rows per program, and a column block smaller than
  the row, so the K loop runs several times and ends in a masked tail (hidden 80 in blocks of 32).
- each kernel's launcher alone against plain float64 PyTorch: `qkv` (RMSNorm, the product, the bias, RoPE on q
  and k, k and v written into the cache), `project_add` and `gate_up`.
- the engine: `fused_kernels=True` runs the kernels at batch 1 and writes the eager loop's tokens, greedy and
  sampled, and the plain engine's cache (a tiny random model's tokens hardly depend on its keys, so the cache is
  the sharper check); at batch 2 it keeps its usual layer, with the eager loop's tokens.
- one clear error for what the kernels do not take (a quantized model, a head_dim the attention kernel cannot
  take, a batch of two rows, a CPU without the interpreter), and the tuned tiles for the real Qwen2.5 shapes.

The interpreter runs each program in Python, so the models stay tiny and the generations short. bfloat16 is not
checked here (the interpreter's bfloat16 arithmetic is not the GPU's); scripts/gpu_decode_kernels.py runs the
kernels on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import left_pad, make_tiny_checkpoint, random_prompts

import minqwen
from minqwen.engine import decode_kernels, fast
from minqwen.engine.decode_kernels import Blocks, Tile
from minqwen.engine.fast import FastQwen2, LayerWeights, Shape
from minqwen.model.sizes import as_config

pytestmark = pytest.mark.skipif(
    not decode_kernels.available(torch.device("cpu")),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1) for CPU tensors",
)

EPS = 1e-6
CAPACITY = 64
# The current token's cache slot: not 0, and with random keys after it that it must not see.
SLOT = 37
LEFT_PADDING = 5  # slots before the prompt, invisible


def random_layer(hidden, intermediate, heads, kv_heads, seed=0):
    """Random fused weights of one layer, every bias non-zero, scaled so activations stay near 1."""
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    qkv_rows = (heads + 2 * kv_heads) * head_dim

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    w = LayerWeights(
        input_norm=1 + 0.2 * randn(hidden),
        qkv_weight=randn(qkv_rows, hidden, scale=hidden**-0.5),
        qkv_bias=randn(qkv_rows),
        o_weight=randn(hidden, heads * head_dim, scale=hidden**-0.5),
        post_norm=1 + 0.2 * randn(hidden),
        gate_up_weight=randn(2 * intermediate, hidden, scale=hidden**-0.5),
        down_weight=randn(hidden, intermediate, scale=intermediate**-0.5),
    )
    keys = randn(1, kv_heads, CAPACITY, head_dim)
    values = randn(1, kv_heads, CAPACITY, head_dim)
    return w, Shape(heads, kv_heads, head_dim, EPS), keys, values, randn(1, 1, hidden)


def rope_row(head_dim, position):
    """cos and sin [head_dim] of one position, as the engine lays them out: each angle twice."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.cat([position * inv_freq] * 2)
    return angles.cos().float(), angles.sin().float()


def visible_slots():
    slots = torch.arange(CAPACITY)
    return ((slots >= LEFT_PADDING) & (slots <= SLOT))[None]  # [1, capacity]


def assert_only_the_slot_changed(cache, before):
    others = torch.arange(CAPACITY) != SLOT
    assert torch.equal(cache[:, :, others], before[:, :, others])


# (hidden, intermediate, heads, kv_heads): the tiny test model; head_dim 32 with 4 query heads per kv head; a
# hidden size that no column block of 32 or 64 divides, with 5 query heads per kv head.
SHAPES = {"tiny": (64, 96, 4, 2), "wide": (128, 352, 4, 1), "ragged": (80, 144, 5, 1)}
TILES = {
    "default": Blocks(),
    "rows 2": Blocks(*[Tile(2, 32)] * 4),
    "rows 8": Blocks(*[Tile(8, 32)] * 4),
    "mixed": Blocks(qkv=Tile(8, 32), o=Tile(32, 64), gate_up=Tile(16, 32), down=Tile(8, 64)),
}
CASES = [
    ("tiny", "default"),
    ("tiny", "rows 2"),
    ("wide", "default"),
    ("wide", "rows 8"),
    ("ragged", "rows 2"),
    ("ragged", "mixed"),
]


@pytest.mark.parametrize("shape, tiles", CASES)
def test_the_kernels_compute_the_eager_layer_and_write_the_slot(shape, tiles):
    w, s, keys, values, x = random_layer(*SHAPES[shape])
    cos, sin = (t[None, None] for t in rope_row(s.head_dim, SLOT - LEFT_PADDING))
    visible = visible_slots()[:, None, None]
    slot = torch.tensor([SLOT])
    eager_keys, eager_values = keys.clone(), values.clone()
    expected = fast.decode_layer(x, cos, sin, visible, slot, eager_keys, eager_values, w, s)
    ours_keys, ours_values = keys.clone(), values.clone()
    out = decode_kernels.decode_layer(
        x, cos, sin, visible, slot, ours_keys, ours_values, w, s, TILES[tiles]
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_keys, eager_keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_values, eager_values, rtol=0, atol=1e-5)
    assert_only_the_slot_changed(ours_keys, keys)
    assert_only_the_slot_changed(ours_values, values)


def normed(x, weight):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean() + EPS) * weight.double()


def rotated(heads, cos, sin):
    """RoPE of heads [n, head_dim]: channel i and i + d/2 rotate together by the angle of pair i."""
    half = heads.shape[-1] // 2
    a, b = heads[:, :half], heads[:, half:]
    c, s = cos[:half].double(), sin[:half].double()
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


@pytest.mark.parametrize("shape, tiles", [("tiny", "rows 2"), ("ragged", "mixed")])
def test_qkv_is_norm_product_bias_and_rope_with_k_and_v_in_the_cache(shape, tiles):
    w, s, keys, values, x = random_layer(*SHAPES[shape], seed=1)
    cos, sin = rope_row(s.head_dim, 11.0)
    before_keys, before_values = keys.clone(), values.clone()
    q = decode_kernels.qkv(
        x.reshape(-1),
        w.input_norm,
        w.qkv_weight,
        w.qkv_bias,
        cos,
        sin,
        torch.tensor([SLOT]),
        keys,
        values,
        EPS,
        s.heads,
        TILES[tiles],
    )
    y = w.qkv_weight.double() @ normed(x.reshape(-1), w.input_norm) + w.qkv_bias.double()
    q_ref, k_ref, v_ref = y.split([s.heads * s.head_dim, *[s.kv_heads * s.head_dim] * 2])
    q_ref = rotated(q_ref.view(s.heads, s.head_dim), cos, sin).reshape(-1)
    k_ref = rotated(k_ref.view(s.kv_heads, s.head_dim), cos, sin)
    torch.testing.assert_close(q.double(), q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(keys[0, :, SLOT].double(), k_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        values[0, :, SLOT].double(), v_ref.view(s.kv_heads, s.head_dim), rtol=0, atol=1e-5
    )
    assert_only_the_slot_changed(keys, before_keys)
    assert_only_the_slot_changed(values, before_values)


@pytest.mark.parametrize("tile", [Tile(2, 32), Tile(8, 64), Tile(32, 512)])
def test_project_add_is_the_residual_plus_the_product(tile):
    g = torch.Generator().manual_seed(2)
    x, residual = torch.randn(144, generator=g), torch.randn(80, generator=g)
    weight = torch.randn(80, 144, generator=g) / 12
    out = decode_kernels.project_add(x, weight, residual, tile, warps=4)
    expected = residual.double() + weight.double() @ x.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tiles", ["rows 2", "mixed"])
def test_gate_up_is_swiglu_of_the_normed_row(tiles):
    w, *_, x = random_layer(*SHAPES["ragged"], seed=3)
    out = decode_kernels.gate_up(x.reshape(-1), w.post_norm, w.gate_up_weight, EPS, TILES[tiles])
    gate, up = (w.gate_up_weight.double() @ normed(x.reshape(-1), w.post_norm)).chunk(2)
    torch.testing.assert_close(out.double(), F.silu(gate) * up, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def biased_model(tiny_checkpoint):
    """The tiny model with random q/k/v biases (the checkpoint's are zero), loaded afresh: tiny_ours stays as it is."""
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.self_attn
            for projection in (attn.q_proj, attn.k_proj, attn.v_proj):
                projection.bias.copy_(torch.randn(projection.bias.shape, generator=g))
    return model


def counting_single_row_layer(engine):
    """Count the engine's calls of the hand-written layer."""
    calls, layer = [], engine._single_row_layer

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return layer(*args, **kwargs)

    engine._single_row_layer = counted
    return calls


@pytest.mark.parametrize(
    "settings",
    [dict(do_sample=False), dict(do_sample=True, seed=5, temperature=1.0)],
    ids=["greedy", "sampled"],
)
def test_the_engine_with_the_kernels_writes_the_eager_tokens_at_batch_1(biased_model, settings):
    engine = FastQwen2(biased_model, bucket=16, use_graphs=False, fused_kernels=True)
    assert engine.fused_kernels
    calls = counting_single_row_layer(engine)
    ids = torch.tensor(random_prompts(6, [9]))
    settings = dict(settings, eos_token_id=[])
    eager = minqwen.generate(biased_model, ids, 6, **settings)
    assert torch.equal(engine.generate(ids, 6, **settings), eager)
    layers = biased_model.config.num_hidden_layers
    assert calls == [1] * layers * 5  # every decode step after the prefill's token, every layer
    # A tiny random model's tokens barely depend on its keys; the caches show every decode step's keys and values.
    plain = FastQwen2(biased_model, bucket=16, use_graphs=False, fused_kernels=False)
    plain.generate(ids, 6, **settings)
    ours, theirs = engine._states[(1, 16)], plain._states[(1, 16)]
    for cache, expected in zip([*ours.keys, *ours.values], [*theirs.keys, *theirs.values]):
        torch.testing.assert_close(cache, expected, rtol=0, atol=1e-5)


def test_at_batch_2_the_engine_keeps_its_layer_and_the_eager_tokens(biased_model):
    engine = FastQwen2(biased_model, bucket=16, use_graphs=False, fused_kernels=True)
    calls = counting_single_row_layer(engine)
    ids, mask = left_pad(random_prompts(7, [9, 5]))
    settings = dict(do_sample=False, eos_token_id=[], attention_mask=mask)
    eager = minqwen.generate(biased_model, ids, 6, **settings)
    assert torch.equal(engine.generate(ids, 6, **settings), eager)
    assert calls == []


def test_a_quantized_model_is_one_clear_error(tiny_checkpoint):
    model = minqwen.quantize(minqwen.Qwen2.from_pretrained(tiny_checkpoint), "int8")
    with pytest.raises(ValueError, match="fused_kernels: the model is quantized"):
        FastQwen2(model, use_graphs=False, fused_kernels=True)
    assert not FastQwen2(model, use_graphs=False).fused_kernels


def test_a_head_dim_the_attention_kernel_cannot_take_is_one_clear_error(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, hidden_size=80)  # 4 heads of 20 channels
    model = minqwen.Qwen2.from_pretrained(folder)
    with pytest.raises(ValueError, match="fused_kernels: head_dim 20 is not a power of two"):
        FastQwen2(model, use_graphs=False, fused_kernels=True)


def test_turning_split_attention_off_while_asking_for_the_kernels_is_one_clear_error(tiny_ours):
    with pytest.raises(ValueError, match="fused_kernels runs attention as the split kernel"):
        FastQwen2(tiny_ours, use_graphs=False, split_attention=False, fused_kernels=True)


def test_the_layer_takes_one_row_only():
    w, s, keys, values, x = random_layer(*SHAPES["tiny"])
    rows = x.expand(2, 1, -1)
    cos, sin = (t.expand(2, 1, -1) for t in rope_row(s.head_dim, 3.0))
    visible = visible_slots().expand(2, -1)[:, None, None]
    keys, values = keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="take one row, got a batch of 2"):
        decode_kernels.decode_layer(
            rows, cos, sin, visible, torch.tensor([SLOT]), keys, values, w, s, Blocks()
        )


def test_on_a_cpu_without_the_interpreter_is_one_clear_error(tiny_ours, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused_kernels needs Triton and a CUDA device"):
        FastQwen2(tiny_ours, use_graphs=False, fused_kernels=True)


def test_the_engine_uses_the_kernels_by_default_only_on_cuda(tiny_ours):
    assert not FastQwen2(tiny_ours, use_graphs=False).fused_kernels  # even under the interpreter


@pytest.mark.parametrize("size", ["0.5B", "1.5B", "7B"])
def test_the_real_shapes_get_their_tuned_tiles_whole(size):
    c = as_config(size)
    blocks = decode_kernels.blocks_for(c)
    assert blocks == decode_kernels.TUNED[(c.hidden_size, c.intermediate_size)]
    assert blocks != Blocks()
    # Every tuned tile fits its shape as measured: the launchers would shrink one that did not divide the rows.
    fitting = decode_kernels._fitting
    assert fitting(c.head_dim // 2, blocks.qkv.rows // 2) == blocks.qkv.rows // 2
    assert fitting(c.hidden_size, blocks.o.rows) == blocks.o.rows
    assert fitting(c.intermediate_size, blocks.gate_up.rows // 2) == blocks.gate_up.rows // 2
    assert fitting(c.hidden_size, blocks.down.rows) == blocks.down.rows


def test_other_shapes_get_the_default_tiles(tiny_ours):
    assert decode_kernels.blocks_for(tiny_ours.config) == Blocks()
