"""Weight-only int4, group-wise: sixteen levels per weight, with a step and an offset per group.

Sixteen levels are too few for one scale per row: the row's largest weight would leave most of the
others on two or three levels. So each row is cut into groups of g consecutive input weights
(g = 32, 64, 128 or 256), and each group gets its own step s and minimum m, asymmetric:

    s = (max - min) / 15,   q = round((w - m) / s) in [0, 15],   w ~ m + s q.

At g = 128 that is 4 bits per weight plus two 16-bit numbers per 128 weights: 4.25 bits.
PyTorch's int4 kernels (`_weight_int4pack_mm` on CUDA, from tinygemm, and its CPU twin
`_weight_int4pack_mm_for_cpu`, the ops torchao and gpt-fast build on) write the same value as
(q - 8) s + z, with the zero point z = m + 8 s, and read the values two to a byte in a tiled layout
of their own. That layout differs between CPU and CUDA, so a layer is packed for the device it is
quantized on, and stays there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from minqwen.quant.int8 import ROWS_PER_SLICE

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
# The CPU packing works on blocks of 16 output rows.
ROWS_MULTIPLE = 16


def quantize_groupwise(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 values [out, in] in 0..15, and float32 steps and minimums [out, in // group_size].

    weight ~ minimums + steps * values, group by group, each value off by at most half a step on this
    float32 grid (`Int4Linear` stores the steps and zero points in bfloat16, which moves each level by a
    little more). A constant group keeps a tiny nonzero step, so that nothing divides by zero."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    values = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    steps = torch.empty(out_features, groups, device=weight.device)
    minimums = torch.empty_like(steps)
    for start in range(0, out_features, ROWS_PER_SLICE):
        rows = slice(start, start + ROWS_PER_SLICE)
        w = weight[rows].detach().float().reshape(-1, groups, group_size)
        minimums[rows], maximums = w.amin(dim=-1), w.amax(dim=-1)
        steps[rows] = ((maximums - minimums[rows]) / 15).clamp(min=1e-8)
        levels = torch.round((w - minimums[rows, :, None]) / steps[rows, :, None]).clamp(0, 15)
        values[rows] = levels.reshape(-1, in_features)
    return values, steps, minimums


def kernel_scales_and_zeros(steps: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """The kernels' [groups, out, 2] tensor of (s, z), z = m + 8 s, for w = (q - 8) s + z."""
    return torch.stack([steps, minimums + 8 * steps], dim=-1).transpose(0, 1).contiguous()


def _inner_k_tiles(in_features: int) -> int:
    """How many 16-wide tiles of the input the CUDA layout interleaves: as many as divide it."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def pack(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 values [out, in] in the layout of the int4 kernel of `device`'s type."""
    in_features = values.shape[1]
    if device.type == "cuda":
        pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(device)
        return torch._convert_weight_to_int4pack(pairs, _inner_k_tiles(in_features))
    return torch._convert_weight_to_int4pack_for_cpu(
        values.to(device, torch.int32), _inner_k_tiles(in_features)
    )


class Int4Weight(NamedTuple):
    """What an int4 product reads: the packed values, the (s, z) of every group, the group size.

    A tuple rather than a module, so the fast engine's compiled layer takes it as it takes a float
    weight, and one compilation serves every layer."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T by the int4 kernel of the device. Both kernels are fast in bfloat16 only (the
        CPU one, given float32 rows, is tens of times slower), so the rows are rounded to
        bfloat16 for the product and the result cast back to their type."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        if self.packed.device.type == "cuda":
            y = torch._weight_int4pack_mm(rows, self.packed, self.group_size, scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.group_size, scales_and_zeros
            )
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def unpacked(self) -> torch.Tensor:
        """The uint8 values [out, in], read back out of the kernel's layout by the kernel itself.

        Given the identity as input, and a step of 1 and zero point of 8 for every group, the
        kernel returns (q - 8) + 8 = q: small integers, exact in bfloat16."""
        groups, out_features, _ = self.scales_and_zeros.shape
        in_features = groups * self.group_size
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=self.packed.device)
        identity = torch.eye(in_features, dtype=torch.bfloat16, device=self.packed.device)
        as_rows = Int4Weight(
            self.packed, unit.expand(groups, out_features, 2).contiguous(), self.group_size
        )
        return as_rows.matmul(identity).T.round().to(torch.uint8)

    @staticmethod
    def concat(weights: list[Int4Weight]) -> Int4Weight:
        """One weight whose output rows are those of `weights`, in order (the fused q/k/v).

        The packed layout tiles rows in blocks that need not line up with each part, so the parts
        are unpacked, joined and packed again."""
        values = torch.cat([w.unpacked() for w in weights])
        return Int4Weight(
            pack(values, weights[0].packed.device),
            torch.cat([w.scales_and_zeros for w in weights], dim=1),
            weights[0].group_size,
        )


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored as int4, with a step and zero point per group."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        device = linear.weight.device
        values, steps, minimums = quantize_groupwise(linear.weight, group_size)
        scales_and_zeros = kernel_scales_and_zeros(steps, minimums)
        self.register_buffer("weight_int4", pack(values, device))
        # Both kernels read the steps and zero points in bfloat16, so they are stored that way.
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device, torch.bfloat16))
        self.packed_for = device.type
        self.bias = linear.bias

    def quantized_weight(self) -> Int4Weight:
        if self.weight_int4.device.type != self.packed_for:
            raise ValueError(
                f"int4 weights are packed for the device they were quantized on ({self.packed_for}) "
                f"and this layer is now on {self.weight_int4.device.type}: move the model first, "
                f"then quantize it"
            )
        return Int4Weight(self.weight_int4, self.scales_and_zeros, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int4 values, steps and zero points stand for."""
        weight = self.quantized_weight()
        values = weight.unpacked().float().reshape(self.out_features, -1, self.group_size)
        steps, zeros = weight.scales_and_zeros.float().transpose(0, 1).unbind(-1)
        return ((values - 8) * steps[..., None] + zeros[..., None]).reshape(
            self.out_features, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized_weight().matmul(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 in groups of {self.group_size}"
        )
