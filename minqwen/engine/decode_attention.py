"""Decode attention in one pass over the KV cache, spread over the whole GPU: split, then merge.

A decode step's attention is, per kv head, a few query rows (the heads that share it) against every
cached key and value. As two matrix products and a softmax it launches three kernels, writes the
scores out and reads them back, and gives the GPU a handful of blocks per kv head: at batch 1 with
2 kv heads, most multiprocessors wait while a few stream the cache. This kernel (the idea of
flash-decoding) cuts the cached positions into `splits` parts, one program per (row, kv head,
part), so that every multiprocessor streams a share of the cache. Each program attends to its part
with an online softmax, keeping its running maximum m, sum of exponentials l and weighted sum of
values a on chip. A second kernel then combines the parts s exactly, one program per query row:

    out = sum_s exp(m_s - M) a_s / sum_s exp(m_s - M) l_s,   M = max_s m_s

`merge_splits` is the same formula in PyTorch, the reference the kernel is tested against. Left to the
compiler it cost more than the parts (book/data/bench/NOTES.md).

The kernel is written in Triton. It runs on CUDA, and on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without Triton keeps the matrix-product attention
    triton = None

# Positions of the cache one loop iteration of a program reads.
BLOCK_N = 64
# Programs to aim for: about two per multiprocessor of an H100 or H200 (132 of them).
TARGET_PROGRAMS = 264
# The most parts one loop iteration of the merge reads. Fewer iterations wait on memory fewer times:
# reading every part at once took the merge from about 6 to 2.5 µs on an H200 (NOTES.md).
MERGE_BLOCK = 128


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: CUDA with Triton, or Triton's interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(head_dim: int) -> str | None:
    """Why the kernel cannot take heads of `head_dim`, or None."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two of at least 16"
    return None


def preferred(device: torch.device, head_dim: int) -> bool:
    """Whether the fast engine uses the kernel by default: on CUDA, where it can. On an H200 it beat
    the matrix products at every context measured (chapter 5); the interpreter is for tests only."""
    return device.type == "cuda" and available(device) and unsupported(head_dim) is None


def split_plan(rows: int, capacity: int, split_len: int | None = None) -> tuple[int, int]:
    """(splits, split_len): the parts a cache of `capacity` is cut into, and their length, for
    `rows` = batch x kv heads.

    Enough parts for about `TARGET_PROGRAMS` programs, each at least one block long."""
    blocks = -(-capacity // BLOCK_N)
    if split_len is None:
        splits = max(1, min(blocks, -(-TARGET_PROGRAMS // rows)))
        split_len = -(-blocks // splits) * BLOCK_N
    return -(-capacity // split_len), split_len


if triton is not None:

    @triton.jit
    def _attend_part(
        q_ptr,
        k_ptr,
        v_ptr,
        visible_ptr,
        acc_ptr,
        stats_ptr,
        capacity,
        splits,
        split_len,
        q_stride_b,
        q_stride_h,
        q_stride_g,
        k_stride_b,
        k_stride_h,
        k_stride_n,
        visible_stride_b,
        SCALE: tl.constexpr,
        KV_HEADS: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUPS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row_head, part = tl.program_id(0), tl.program_id(1)
        b, h = row_head // KV_HEADS, row_head % KV_HEADS
        g, d = tl.arange(0, GROUPS_PAD), tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + b * q_stride_b + h * q_stride_h + g[:, None] * q_stride_g + d[None, :],
            mask=g[:, None] < GROUPS,
            other=0.0,
        )
        m = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, HEAD_DIM], tl.float32)
        cache = k_stride_b * b + k_stride_h * h
        for offset in range(0, split_len, BLOCK):
            n = part * split_len + offset + tl.arange(0, BLOCK)
            inside = n < capacity
            seen = tl.load(visible_ptr + b * visible_stride_b + n, mask=inside, other=0) != 0
            k = tl.load(
                k_ptr + cache + n[:, None] * k_stride_n + d[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            # Until a part has seen a visible key its maximum is -inf; shifting by 0 then keeps
            # exp() at 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(m - shift)
            total = total * rescale + tl.sum(p, 1)
            v = tl.load(
                v_ptr + cache + n[:, None] * k_stride_n + d[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
        out = (row_head * splits + part) * GROUPS_PAD + g
        tl.store(acc_ptr + out[:, None] * HEAD_DIM + d[None, :], acc)
        tl.store(stats_ptr + out * 2, m)
        tl.store(stats_ptr + out * 2 + 1, total)

    @triton.jit
    def _merge_parts(
        acc_ptr,
        stats_ptr,
        out_ptr,
        splits,
        GROUPS: tl.constexpr,
        GROUPS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row_head, g = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, HEAD_DIM)
        big_m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        weighted = tl.zeros([HEAD_DIM], tl.float32)
        # The merge formula as a running sum over blocks of parts, rescaled whenever M grows.
        for start in range(0, splits, BLOCK):
            s = start + tl.arange(0, BLOCK)
            part = (row_head * splits + s) * GROUPS_PAD + g
            m = tl.load(stats_ptr + part * 2, mask=s < splits, other=float("-inf"))
            size = tl.load(stats_ptr + part * 2 + 1, mask=s < splits, other=0.0)
            a = tl.load(
                acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
                mask=(s < splits)[:, None],
                other=0.0,
            )
            m_new = tl.maximum(big_m, tl.max(m, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            weight = tl.exp(m - shift)
            rescale = tl.exp(big_m - shift)
            total = total * rescale + tl.sum(weight * size, 0)
            weighted = weighted * rescale + tl.sum(weight[:, None] * a, 0)
            big_m = m_new
        out = weighted / total
        tl.store(out_ptr + (row_head * GROUPS + g) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def merge_splits(acc: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Combine the parts: acc [..., splits, groups, head_dim] and stats [..., splits, groups, 2]
    (m, l) to the softmax-weighted sum of values [..., groups, head_dim]."""
    m, total = stats[..., 0], stats[..., 1]
    weight = torch.exp(m - m.amax(dim=-2, keepdim=True))
    return (weight[..., None] * acc).sum(-3) / (weight * total).sum(-2)[..., None]


def merge_parts(
    acc: torch.Tensor, stats: torch.Tensor, groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """`merge_splits` as one Triton kernel: acc [batch, kv_heads, splits, groups_pad, head_dim] and
    stats [..., 2] from `_attend_part` to [batch, kv_heads, groups, head_dim] in `dtype`, dropping
    the padding rows beyond `groups`."""
    batch, kv_heads, splits, groups_pad, head_dim = acc.shape
    out = torch.empty(batch, kv_heads, groups, head_dim, dtype=dtype, device=acc.device)
    _merge_parts[(batch * kv_heads, groups)](
        acc,
        stats,
        out,
        splits,
        GROUPS=groups,
        GROUPS_PAD=groups_pad,
        HEAD_DIM=head_dim,
        BLOCK=min(MERGE_BLOCK, max(16, triton.next_power_of_2(splits))),
    )
    return out


def split_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    *,
    split_len: int | None = None,
) -> torch.Tensor:
    """Attention of q [batch, kv_heads, groups, head_dim] over the cache
    [batch, kv_heads, capacity, head_dim] at the positions `visible` [batch, capacity] marks;
    [batch, kv_heads, groups, head_dim] in q's dtype.

    `split_len` fixes the length of the parts (a multiple of `BLOCK_N`); by default `split_plan`
    picks it."""
    batch, kv_heads, groups, head_dim = q.shape
    capacity = keys.shape[2]
    if q.stride(-1) != 1 or keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError(
            "split_attention needs q, keys and values contiguous in head_dim, keys and values alike"
        )
    splits, split_len = split_plan(batch * kv_heads, capacity, split_len)
    groups_pad = max(16, triton.next_power_of_2(groups))
    acc = torch.empty(
        batch, kv_heads, splits, groups_pad, head_dim, dtype=torch.float32, device=q.device
    )
    stats = torch.empty(
        batch, kv_heads, splits, groups_pad, 2, dtype=torch.float32, device=q.device
    )
    _attend_part[(batch * kv_heads, splits)](
        q,
        keys,
        values,
        visible,
        acc,
        stats,
        capacity,
        splits,
        split_len,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        visible.stride(0),
        SCALE=scale,
        KV_HEADS=kv_heads,
        GROUPS=groups,
        GROUPS_PAD=groups_pad,
        HEAD_DIM=head_dim,
        BLOCK=BLOCK_N,
    )
    return merge_parts(acc, stats, groups, q.dtype)
