"""Weight-only int8: every projection's weight as int8, with one float scale per output channel.

Decoding at batch 1 reads every weight once per token, so a step takes about as long as its bytes
take to stream. Storing a weight matrix W as int8 values q with a scale s_o per output row,

    q_oi = round(W_oi / s_o),   s_o = max_i |W_oi| / 127,

cuts its bytes by four against float32 (two against bfloat16). Each output becomes
y_o = s_o (x . q_o), so the scale is applied once per output, after the products. Activations stay
floating point: this is weight-only quantization.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minqwen.quant import int8_matvec

# Rows up to which an eager CUDA product uses the matrix-vector kernel; a longer prompt is a matrix product.
MATVEC_MAX_ROWS = 16


# Rows quantized at once: a whole LM head in float32 temporaries would be several copies of it (NOTES.md).
ROWS_PER_SLICE = 4096


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values [out, in] and float32 scales [out] with weight ~ scales[:, None] * values.

    Symmetric: the largest magnitude of each row maps to 127, and every value is off by at most
    half a scale. An all-zero row gets scale 1, so that nothing divides by zero."""
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_SLICE):
        rows = slice(start, start + ROWS_PER_SLICE)
        w = weight[rows].detach().float()
        row_scales = w.abs().amax(dim=1) / 127
        scales[rows] = torch.where(row_scales == 0, torch.ones_like(row_scales), row_scales)
        values[rows] = torch.round(w / scales[rows, None]).clamp(-127, 127)
    return values, scales


# Inside torch.compile on CUDA (the fast engine's prefill), inductor 2.11 fails an internal assertion on this
# product when the widening is left for it to fuse into the matrix product; run as it is, it is two library kernels.
@torch.compiler.disable
def widened_product(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (values * scales).T with the int8 values widened to x's type, the scale applied to the result."""
    return F.linear(x, values.to(x.dtype)) * scales


class Int8Weight(NamedTuple):
    """What an int8 product reads: the values [out, in] and one scale per output row.

    A tuple of tensors rather than a module, so the fast engine's compiled layer takes it as it
    takes a float weight, and one compilation serves every layer."""

    values: torch.Tensor
    scales: torch.Tensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T, with W the weight the values and scales stand for.

        - On a CPU in bfloat16: PyTorch's packed int8 kernel (`_weight_int8pack_mm`, the op
          gpt-fast and torchao build on), which reads the int8 matrix as it is.
        - On CUDA, for decode (a few rows, or one new token per row at any batch inside the fast
          engine's compiled step): the Triton kernel of `minqwen.quant.int8_matvec`, which reads
          the int8 matrix as it is (on an H200 not yet faster than bfloat16:
          book/data/bench/NOTES.md).
        - Otherwise (a prompt on CUDA, float32 on a CPU): the int8 matrix widened to the
          activations' type, then a float product.
        """
        scales = self.scales.to(x.dtype)
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x.reshape(rows, -1), self.values, scales)
            return y.reshape(*x.shape[:-1], -1)
        if (
            x.device.type == "cuda"
            and int8_matvec.triton is not None
            and (rows <= MATVEC_MAX_ROWS or (torch.compiler.is_compiling() and x.shape[-2] == 1))
        ):
            return int8_matvec.int8_matvec(x, self.values, scales)
        return widened_product(x, self.values, scales)

    @staticmethod
    def concat(weights: list[Int8Weight]) -> Int8Weight:
        """One weight whose output rows are those of `weights`, in order (the fused q/k/v)."""
        return Int8Weight(
            torch.cat([w.values for w in weights]), torch.cat([w.scales for w in weights])
        )


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scales = quantize_per_channel(linear.weight)
        self.register_buffer("weight_int8", values.to(linear.weight.device))
        self.register_buffer("scales", scales.to(linear.weight.device))
        self.bias = linear.bias

    def quantized_weight(self) -> Int8Weight:
        return Int8Weight(self.weight_int8, self.scales)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int8 values and scales stand for."""
        return self.weight_int8.float() * self.scales[:, None].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized_weight().matmul(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"
