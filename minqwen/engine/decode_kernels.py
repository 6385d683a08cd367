"""One row's decoder layer in six hand-written kernels: chapter 5's "fewer, fuller kernels".

At batch 1 a decode step reads every weight once and does almost nothing else, so its floor is the time to read
the weights. A small model misses that floor by a kernel count, not by bandwidth: compiled, its layer is about
eleven kernels (norm statistics, projections, RoPE, the cache writes, attention, residual adds), each a few
microseconds of launch and memory latency around well under a microsecond of reading. Here the layer is:

1. `_qkv`: RMSNorm, the fused q/k/v projection with its bias, RoPE on q and k, and k and v written into the
   cache at the current slot. Each program recomputes the norm's statistic from the row (a few KB, from L2),
   so the norm needs no kernel of its own; it takes a channel and its RoPE partner (i and i + d/2) together, so
   the rotation needs no second pass.
2. and 3. split attention and its merge (`minqwen.engine.decode_attention`);
4. `_project_add`: the output projection and the residual add;
5. `_gate_up`: RMSNorm, the fused gate/up projection and SwiGLU: a program takes gate row j with up row j;
6. `_project_add` again: the down projection and the residual add.

Every projection is a matrix-vector product in which each program reduces a few whole rows of the weight,
accumulating `ROWS x BLOCK_K` partial products in float32 and summing them once at the end. The roundings follow
the eager layer's: the normed row, each projection's output, SwiGLU's two factors and each residual sum are
rounded to the model's dtype where the eager layer rounds them, so in float32 the kernels equal the eager
layer to rounding (the tests run them in Triton's interpreter on the CPU).

Only a single row: at batch 2 and beyond the engine keeps the compiled layer, whose products then read each
weight once for all rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minqwen.engine import decode_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without Triton keeps the compiled layer
    triton = None


class Tile(NamedTuple):
    """How a projection kernel cuts its work: output rows per program, input columns per loop iteration."""

    rows: int
    block_k: int


class Blocks(NamedTuple):
    """A tile for each kernel. `_qkv` takes rows in RoPE pairs and `_gate_up` in (gate, up) pairs, so their
    tiles count weight rows, two per output pair. The defaults are a middle ground; `TUNED` holds the tiles
    measured fastest for each Qwen2.5 shape."""

    qkv: Tile = Tile(8, 512)
    o: Tile = Tile(8, 512)
    gate_up: Tile = Tile(16, 512)
    down: Tile = Tile(8, 512)
    warps: int = 4


# The fastest tile of each kernel for each (hidden, intermediate) size on an H200: each kernel run over every
# layer's weights in turn inside a CUDA graph, as a decode step reads them, over 2-32 rows and 256-1,024 columns
# (scripts/gpu_decode_kernels.py, book/data/kernels/tune-nvidia-h200-2026-12-01.jsonl). Small weights want few
# rows per program: many programs in flight hide the memory latency that dominates a 2 MB read.
TUNED = {
    (896, 4864): Blocks(
        qkv=Tile(2, 512), o=Tile(2, 1024), gate_up=Tile(8, 256), down=Tile(2, 1024)
    ),
    (1536, 8960): Blocks(
        qkv=Tile(2, 512), o=Tile(2, 1024), gate_up=Tile(4, 512), down=Tile(2, 1024)
    ),
    (3584, 18944): Blocks(
        qkv=Tile(8, 1024), o=Tile(2, 512), gate_up=Tile(8, 256), down=Tile(2, 1024)
    ),
}


def blocks_for(config) -> Blocks:
    """The measured tiles for the config's shape, or the defaults."""
    return TUNED.get((config.hidden_size, config.intermediate_size), Blocks())


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: those of decode attention's, CUDA or Triton's interpreter."""
    return decode_attention.available(device)


def unsupported(config, quantized: bool, tensor_parallel: bool) -> str | None:
    """Why these kernels cannot run a model of `config`, or None."""
    if quantized:
        return "the model is quantized; its weights bring their own products"
    if tensor_parallel:
        return "the model is split over several GPUs"
    if reason := decode_attention.unsupported(config.head_dim):
        return reason
    return None


def _fitting(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


if triton is not None:

    @triton.jit
    def _inverse_rms(x_ptr, K, eps, BLOCK_K: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) of the row x [K], in float32."""
        squares = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            squares += x * x
        return tl.rsqrt(tl.sum(squares, 0) / K + eps)

    @triton.jit
    def _normed(x_ptr, norm_ptr, k, K, inv_rms):
        """Columns k of the normed row in float32, rounded as `rms_norm` rounds: scaled in float32, rounded to
        the row's dtype, multiplied by the norm's weight."""
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        weight = tl.load(norm_ptr + k, mask=k < K, other=0.0)
        return (weight * (x.to(tl.float32) * inv_rms).to(x.dtype)).to(tl.float32)

    @triton.jit
    def _qkv(
        x_ptr,
        norm_ptr,
        w_ptr,
        bias_ptr,
        cos_ptr,
        sin_ptr,
        slot_ptr,
        q_ptr,
        keys_ptr,
        values_ptr,
        K,
        eps,
        cache_stride_h,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PAIRS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        half: tl.constexpr = HEAD_DIM // 2
        programs_per_head: tl.constexpr = half // PAIRS
        head = tl.program_id(0) // programs_per_head
        channel = (tl.program_id(0) % programs_per_head) * PAIRS + tl.arange(0, PAIRS)
        # Rows of the weight: channel i of the head, and its RoPE partner i + d/2.
        first = head * HEAD_DIM + channel
        second = first + half
        inv_rms = _inverse_rms(x_ptr, K, eps, BLOCK_K)
        acc_first = tl.zeros([PAIRS, BLOCK_K], tl.float32)
        acc_second = tl.zeros([PAIRS, BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = _normed(x_ptr, norm_ptr, k, K, inv_rms)[None, :]
            inside = (k < K)[None, :]
            w_first = tl.load(w_ptr + first[:, None] * K + k[None, :], mask=inside, other=0.0)
            w_second = tl.load(w_ptr + second[:, None] * K + k[None, :], mask=inside, other=0.0)
            acc_first += w_first.to(tl.float32) * x
            acc_second += w_second.to(tl.float32) * x
        dtype = q_ptr.dtype.element_ty
        bias_first = tl.load(bias_ptr + first).to(tl.float32)
        bias_second = tl.load(bias_ptr + second).to(tl.float32)
        a = (tl.sum(acc_first, 1) + bias_first).to(dtype).to(tl.float32)
        b = (tl.sum(acc_second, 1) + bias_second).to(dtype).to(tl.float32)
        if head < HEADS + KV_HEADS:  # q and k heads rotate; v heads do not
            cos = tl.load(cos_ptr + channel).to(tl.float32)
            sin = tl.load(sin_ptr + channel).to(tl.float32)
            a, b = a * cos - b * sin, b * cos + a * sin
        if head < HEADS:
            tl.store(q_ptr + first, a.to(dtype))
            tl.store(q_ptr + second, b.to(dtype))
        elif head < HEADS + KV_HEADS:
            key = keys_ptr + (head - HEADS) * cache_stride_h + tl.load(slot_ptr) * HEAD_DIM
            tl.store(key + channel, a.to(dtype))
            tl.store(key + channel + half, b.to(dtype))
        else:
            value = (
                values_ptr
                + (head - HEADS - KV_HEADS) * cache_stride_h
                + tl.load(slot_ptr) * HEAD_DIM
            )
            tl.store(value + channel, a.to(dtype))
            tl.store(value + channel + half, b.to(dtype))

    @triton.jit
    def _project_add(
        x_ptr, w_ptr, residual_ptr, out_ptr, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=(k < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        residual = tl.load(residual_ptr + rows)
        tl.store(out_ptr + rows, tl.sum(acc, 1).to(residual.dtype) + residual)

    @triton.jit
    def _gate_up(
        x_ptr,
        norm_ptr,
        w_ptr,
        out_ptr,
        K,
        INTERMEDIATE,
        eps,
        ROWS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Gate rows; their up rows are INTERMEDIATE further down the stacked weight.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        inv_rms = _inverse_rms(x_ptr, K, eps, BLOCK_K)
        acc_gate = tl.zeros([ROWS, BLOCK_K], tl.float32)
        acc_up = tl.zeros([ROWS, BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = _normed(x_ptr, norm_ptr, k, K, inv_rms)[None, :]
            inside = (k < K)[None, :]
            gate = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=inside, other=0.0)
            up = tl.load(
                w_ptr + (rows[:, None] + INTERMEDIATE) * K + k[None, :], mask=inside, other=0.0
            )
            acc_gate += gate.to(tl.float32) * x
            acc_up += up.to(tl.float32) * x
        dtype = out_ptr.dtype.element_ty
        gate = tl.sum(acc_gate, 1).to(dtype).to(tl.float32)
        up = tl.sum(acc_up, 1).to(dtype)
        tl.store(out_ptr + rows, (gate * tl.sigmoid(gate)).to(dtype) * up)


def qkv(
    x, norm, weight, bias, cos, sin, slot, keys, values, eps: float, heads: int, blocks: Blocks
):
    """q [heads * head_dim] of the row x [hidden], RoPE applied; its key and value written into the cache
    keys/values [1, kv_heads, capacity, head_dim] at `slot` [1]. cos and sin are the row's [head_dim]."""
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    q = torch.empty(heads * head_dim, dtype=x.dtype, device=x.device)
    pairs = _fitting(head_dim // 2, max(blocks.qkv.rows // 2, 1))
    _qkv[((heads + 2 * kv_heads) * head_dim // 2 // pairs,)](
        x,
        norm,
        weight,
        bias,
        cos,
        sin,
        slot,
        q,
        keys,
        values,
        x.shape[-1],
        eps,
        keys.stride(1),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        PAIRS=pairs,
        BLOCK_K=_block_k(blocks.qkv, x),
        num_warps=blocks.warps,
    )
    return q


def project_add(x, weight, residual, tile: Tile, warps: int):
    """residual + weight @ x, for the row x [in] and residual [out]."""
    out = torch.empty_like(residual)
    rows = _fitting(weight.shape[0], tile.rows)
    _project_add[(weight.shape[0] // rows,)](
        x,
        weight,
        residual,
        out,
        x.shape[-1],
        ROWS=rows,
        BLOCK_K=_block_k(tile, x),
        num_warps=warps,
    )
    return out


def gate_up(x, norm, weight, eps: float, blocks: Blocks):
    """SwiGLU of the normed row x [hidden]: silu(gate) * up [intermediate], with weight = [gate; up]."""
    intermediate = weight.shape[0] // 2
    out = torch.empty(intermediate, dtype=x.dtype, device=x.device)
    rows = _fitting(intermediate, max(blocks.gate_up.rows // 2, 1))
    _gate_up[(intermediate // rows,)](
        x,
        norm,
        weight,
        out,
        x.shape[-1],
        intermediate,
        eps,
        ROWS=rows,
        BLOCK_K=_block_k(blocks.gate_up, x),
        num_warps=blocks.warps,
    )
    return out


def _block_k(tile: Tile, x: torch.Tensor) -> int:
    return min(tile.block_k, triton.next_power_of_2(x.shape[-1]))


def decode_layer(x, cos, sin, visible, slot, keys, values, w, s, blocks: Blocks):
    """`minqwen.engine.fast.decode_layer` for one row, x [1, 1, hidden], in six kernels; the same arguments,
    and the kernels' tiles."""
    if x.shape[0] != 1:
        raise ValueError(
            f"the hand-written decode kernels take one row, got a batch of {x.shape[0]}"
        )
    row = x.reshape(-1)
    q = qkv(
        row,
        w.input_norm,
        w.qkv_weight,
        w.qkv_bias,
        cos.reshape(-1),
        sin.reshape(-1),
        slot,
        keys,
        values,
        s.eps,
        s.heads,
        blocks,
    )
    groups = s.heads // s.kv_heads
    attended = decode_attention.split_attention(
        q.view(1, s.kv_heads, groups, s.head_dim), keys, values, visible[:, 0, 0], s.head_dim**-0.5
    )
    row = project_add(attended.reshape(-1), w.o_weight, row, blocks.o, blocks.warps)
    act = gate_up(row, w.post_norm, w.gate_up_weight, s.eps, blocks)
    return project_add(act, w.down_weight, row, blocks.down, blocks.warps).view_as(x)
