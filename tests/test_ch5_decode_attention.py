"""Chapter 5: the split decode-attention kernel computes softmax attention over the visible cache, exactly.

Without a GPU the Triton kernel runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), on float32
CPU tensors: its result must match float64 attention to float32 rounding, whatever the number of parts, with
left padding, a cache longer than the visible prefix, and a part with no visible key at all. float16 checks the
16-bit path (the probabilities rounded before the second product); bfloat16 cannot be checked here, because the
interpreter's bfloat16 matrix product is wrong, so scripts/gpu_decode_profile.py measures the
kernel's bfloat16 error on the GPU, and the results are committed under book/data/profile/.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

import minqwen
from minqwen.engine import decode_attention
from minqwen.engine.decode_attention import (
    BLOCK_N,
    MERGE_BLOCK,
    merge_parts,
    merge_splits,
    split_attention,
    split_plan,
)
from minqwen.engine.fast import FastQwen2, matmul_attention

pytestmark = pytest.mark.skipif(
    not decode_attention.available(torch.device("cpu")) and not torch.cuda.is_available(),
    reason="needs Triton (its interpreter on the CPU)",
)


def reference(q, keys, values, visible, scale):
    scores = (q.double() @ keys.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ values.double()


def cache(batch, kv_heads, groups, head_dim, capacity, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads, groups, head_dim, generator=g)
    keys = torch.randn(batch, kv_heads, capacity, head_dim, generator=g)
    values = torch.randn(batch, kv_heads, capacity, head_dim, generator=g)
    visible = torch.ones(batch, capacity, dtype=torch.bool)
    return q, keys, values, visible


@pytest.mark.parametrize(
    "batch, kv_heads, groups, head_dim, capacity",
    [(1, 2, 7, 64, 256), (2, 2, 7, 64, 300), (1, 4, 7, 128, 200), (3, 1, 2, 16, 70)],
)
@pytest.mark.parametrize("split_len", [None, BLOCK_N, 2 * BLOCK_N, 1024])
def test_matches_float64_attention_for_any_split(
    batch, kv_heads, groups, head_dim, capacity, split_len
):
    q, keys, values, visible = cache(batch, kv_heads, groups, head_dim, capacity)
    visible[:, capacity - 37 :] = False  # slots after the current token
    visible[0, :9] = False  # left padding of the first row
    scale = head_dim**-0.5
    out = split_attention(q, keys, values, visible, scale, split_len=split_len)
    expected = reference(q, keys, values, visible, scale)
    assert out.shape == (batch, kv_heads, groups, head_dim) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_float16_matches_the_matrix_product_attention_to_its_rounding():
    q, keys, values, visible = cache(1, 2, 7, 64, 256)
    visible[:, 200:] = False
    scale = 0.125
    half = [t.half() for t in (q, keys, values)]
    exact = reference(q, keys, values, visible, scale)
    ours = (split_attention(*half, visible, scale).double() - exact).abs().max()
    theirs = (matmul_attention(*half, visible[:, None, None], scale).double() - exact).abs().max()
    assert ours <= 2 * theirs and ours < 1e-2


def test_a_part_without_visible_keys_adds_nothing():
    q, keys, values, visible = cache(1, 2, 7, 64, 4 * BLOCK_N)
    visible[:, : 2 * BLOCK_N] = False  # the first two parts see nothing
    out = split_attention(q, keys, values, visible, 0.125, split_len=BLOCK_N)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double(), reference(q, keys, values, visible, 0.125), rtol=0, atol=2e-6
    )


def test_merging_parts_is_exact_softmax_arithmetic():
    """Two halves attended separately and merged equal the whole: the identity the kernel relies on."""
    scores = torch.randn(5, 40, dtype=torch.float64)
    values = torch.randn(40, 8, dtype=torch.float64)
    parts = []
    for half in (slice(0, 20), slice(20, 40)):
        m = scores[:, half].amax(-1)
        p = torch.exp(scores[:, half] - m[:, None])
        parts.append((p @ values[half], torch.stack([m, p.sum(-1)], -1)))
    acc = torch.stack([a for a, _ in parts], dim=0)
    stats = torch.stack([s for _, s in parts], dim=0)
    torch.testing.assert_close(merge_splits(acc, stats), scores.softmax(-1) @ values)


@pytest.mark.parametrize("splits", [1, 5, MERGE_BLOCK, 2 * MERGE_BLOCK + 7])
def test_the_merge_kernel_is_the_merge_formula(splits):
    """Parts as `_attend_part` leaves them (groups padded to 16, some parts empty) merge in the
    kernel as in `merge_splits`, over several blocks of parts and a ragged last one."""
    g = torch.Generator().manual_seed(splits)
    acc = torch.randn(2, 3, splits, 16, 32, generator=g)
    m = torch.randn(2, 3, splits, 16, generator=g) * 5
    m[0, 0, : splits // 2] = float("-inf")  # parts before any visible key
    acc[0, 0, : splits // 2] = 0.0
    total = torch.rand(2, 3, splits, 16, generator=g) + 0.5
    total[0, 0, : splits // 2] = 0.0
    stats = torch.stack([m, total], -1)
    merged = merge_parts(acc, stats, 7, torch.float32)
    assert merged.shape == (2, 3, 7, 32)
    torch.testing.assert_close(merged, merge_splits(acc, stats)[:, :, :7], rtol=1e-6, atol=1e-6)


def test_split_plan_covers_the_cache_with_enough_parts():
    for rows, capacity in [(2, 256), (4, 32768), (64, 4096), (1, 64)]:
        splits, split_len = split_plan(rows, capacity)
        assert (
            split_len % BLOCK_N == 0 and (splits - 1) * split_len < capacity <= splits * split_len
        )
        # Parts are whole blocks, so the plan can fall short of its target, never by half.
        wanted = min(decode_attention.TARGET_PROGRAMS, rows * -(-capacity // BLOCK_N))
        assert 2 * rows * splits > wanted


def test_agrees_with_the_matrix_product_attention():
    q, keys, values, visible = cache(2, 2, 7, 64, 192)
    visible[1, 150:] = False
    torch.testing.assert_close(
        split_attention(q, keys, values, visible, 0.125),
        matmul_attention(q, keys, values, visible[:, None, None], 0.125),
        rtol=0,
        atol=2e-6,
    )


def test_fast_engine_with_the_kernel_writes_the_eager_tokens(tiny_ours):
    fast = FastQwen2(tiny_ours, bucket=16, split_attention=True)
    assert fast.shape.split_attention
    prompts = torch.tensor(random_prompts(3, [9, 9]))
    eager = minqwen.generate(tiny_ours, prompts, 12, do_sample=False, eos_token_id=[])
    assert torch.equal(fast.generate(prompts, 12, do_sample=False, eos_token_id=[]), eager)


def test_split_attention_on_a_cpu_without_the_interpreter_is_one_clear_error(
    tiny_ours, monkeypatch
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="split_attention needs Triton and a CUDA device"):
        FastQwen2(tiny_ours, split_attention=True)
    assert not FastQwen2(tiny_ours).shape.split_attention


def test_the_engine_uses_the_kernel_by_default_only_where_it_belongs():
    assert decode_attention.preferred(torch.device("cuda"), 64)
    assert decode_attention.preferred(torch.device("cuda"), 128)
    assert not decode_attention.preferred(torch.device("cuda"), 80)  # not a power of two
    assert not decode_attention.preferred(torch.device("cpu"), 64)  # even under the interpreter
