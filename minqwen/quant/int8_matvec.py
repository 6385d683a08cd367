"""A Triton kernel for the int8 product at decode: y = s * (x . q) for a few rows x, streaming q once.

Compiled PyTorch widens an int8 weight to bfloat16 on its way into a library matrix product, or
turns a single row into a reduction; on an H200 both read an int8 matrix at about 1 TB/s, slower
than the plain bfloat16 product reads twice the bytes (book/data/bench/NOTES.md). This kernel gives
each program `BLOCK_N` output rows of the weight and walks their inputs `BLOCK_K` at a time: it
loads the int8 tile, widens it in registers, multiplies by the matching slice of x and sums across,
so the weight crosses memory once, as int8, and the scale is applied once per output at the end.
One program per (block of outputs, row of x): for a few rows the weight tile is re-read from cache,
not memory. It runs on CUDA, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which
is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # without Triton, int8 products widen the weight instead
    triton = None

# Output rows per program: small, so a 3,584-row projection gives 224 programs, more than an H200's 132
# multiprocessors; the 0.5B model's 896-row ones give only 56, which leaves most of them idle.
BLOCK_N = 16
# Inputs per loop step: 16 x 512 int8 is 8 KB of weight per step and program.
BLOCK_K = 512

if triton is not None:

    @triton.jit
    def _int8_matvec(
        x_ptr,
        q_ptr,
        s_ptr,
        y_ptr,
        N,
        K,
        x_stride,
        y_stride,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        block, row = tl.program_id(0), tl.program_id(1)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_inside = n < N
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            k_inside = k < K
            x = tl.load(x_ptr + row * x_stride + k, mask=k_inside, other=0.0).to(tl.float32)
            q = tl.load(
                q_ptr + n[:, None] * K + k[None, :],
                mask=n_inside[:, None] & k_inside[None, :],
                other=0,
            ).to(tl.float32)
            acc += tl.sum(q * x[None, :], axis=1)
        s = tl.load(s_ptr + n, mask=n_inside, other=0.0).to(tl.float32)
        tl.store(
            y_ptr + row * y_stride + n,
            (acc * s).to(y_ptr.dtype.element_ty),
            mask=n_inside,
        )


def int8_matvec(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] times the int8 `values` [out, in] with per-output `scales` [out]: [..., out] in
    x's dtype, accumulated in float32."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_features, in_features = values.shape
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, BLOCK_N), rows.shape[0])
    _int8_matvec[grid](
        rows,
        values,
        scales,
        y,
        out_features,
        in_features,
        rows.stride(0),
        y.stride(0),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return y.reshape(*x.shape[:-1], out_features)
