"""Rotary position embeddings: the frequencies (plain and YaRN), the cos/sin tables, and the rotation itself."""

from __future__ import annotations

import math

import torch

from minqwen.model.config import ModelConfig


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i = 0 .. d/2-1: one rotation speed per pair of channels."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def yarn_inv_freq(
    head_dim: int, theta: float, scaling: dict, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the slow channels by `factor`, keep the fast ones, blend linearly in between.

    `scaling` holds `factor` and `original_max_position_embeddings` (the pre-training context), and optionally
    `beta_fast`/`beta_slow` (the rotation counts that bound the blend), `truncate` (round the bounds to whole
    channels, the default), and `attention_factor` or `mscale`/`mscale_all_dim`. A missing `factor` is the ratio of
    the extended context to the original one. Returns the frequencies and the attention scale ("mscale") that
    multiplies cos and sin.
    """
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / original
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def channel_of(rotations: float) -> float:
        # the channel pair whose wavelength fits `rotations` full turns into the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = channel_of(beta_fast), channel_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a one-channel ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    wavelength_scale = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation, interpolation = 1.0 / wavelength_scale, 1.0 / (factor * wavelength_scale)
    # `kept` is the share of its original frequency a channel keeps: 1 for the fast ones, 0 for the slow ones.
    # Written as 1 - ramp, then 1 - kept, so the float32 rounding matches transformers' bit for bit.
    kept = 1 - ramp
    inv_freq = interpolation * (1 - kept) + extrapolation * kept
    return inv_freq, _yarn_attention_factor(scaling, factor)


def _yarn_attention_factor(scaling: dict, factor: float) -> float:
    """How much YaRN scales cos and sin: 0.1 ln(factor) + 1 by default (the paper's fit), 1 when not stretching."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(weight: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"]))
    return mscale()


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Frequencies and cos/sin scale for a config: plain RoPE, or YaRN when rope_scaling asks for it."""
    if config.rope_type == "yarn":
        return yarn_inv_freq(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
    return default_inv_freq(config.head_dim, config.rope_theta), 1.0


def rope_cos_sin(
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle = position x frequency, each [batch, seq, head_dim], computed in float32.

    Both halves of the head repeat the same angles, matching the rotate-half layout below.
    """
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device).float()
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Pair channel i with channel i + d/2 and rotate by 90 degrees: (a, b) -> (-b, a)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by the angles in cos/sin [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
