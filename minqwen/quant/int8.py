"""Weight-only int8: every projection's weight as int8, with one float scale per output channel.

Decoding at batch 1 reads every weight once per token, so a step takes about as long as its bytes
take to stream. Storing a weight matrix W as int8 values q with a scale s_o per output row,

    q_oi = round(W_oi / s_o),   s_o = max_i |W_oi| / 127,

cuts its bytes by four against float32 (two against bfloat16). Each output becomes
y_o = s_o (x . q_o), so the scale is applied once per output, after the products. Activations stay
floating point: this is weight-only quantization. On a CPU in bfloat16 the product runs in PyTorch's
packed int8 kernel (`_weight_int8pack_mm`, the op gpt-fast and torchao build on); elsewhere the int8
matrix is widened to the activations' dtype first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minqwen.model.qwen2 import Qwen2

PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values [out, in] and float32 scales [out] with weight ~ scales[:, None] * values.

    Symmetric: the largest magnitude of each row maps to 127, and every value is off by at most
    half a scale. An all-zero row gets scale 1, so that nothing divides by zero."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    values = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scales = quantize_per_channel(linear.weight)
        self.register_buffer("weight_int8", values.to(linear.weight.device))
        self.register_buffer("scales", scales.to(linear.weight.device))
        self.bias = linear.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int8 values and scales stand for."""
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            rows = x.reshape(-1, self.in_features)
            scales = self.scales.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(rows, self.weight_int8, scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def quantize(model: Qwen2, scheme: str = "int8") -> Qwen2:
    """Quantize a loaded `Qwen2`'s projections in place and return it.

    Every attention and MLP projection becomes an `Int8Linear`. So does an untied LM head; a head
    tied to the embedding stays as it is, since quantizing it would make a second copy of the
    largest matrix."""
    if scheme != "int8":
        raise ValueError(f"unknown quantization scheme {scheme!r}; this version offers 'int8'")
    if not isinstance(model, Qwen2):
        raise ValueError(f"quantize takes a minqwen Qwen2, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError(
            "this model is already quantized; load it again to quantize it another way"
        )
    with torch.no_grad():
        for layer in model.layers:
            for part, names in PROJECTIONS.items():
                module = getattr(layer, part)
                for name in names:
                    setattr(module, name, Int8Linear(getattr(module, name)))
        if model.lm_head.weight is not model.embed_tokens.weight:
            model.lm_head = Int8Linear(model.lm_head)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
