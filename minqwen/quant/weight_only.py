"""`minqwen.quantize`: a loaded model's projections stored in fewer bits, in place.

Weight-only: activations, norms, the KV cache and the embedding stay in floating point; only the
matrices that a decode step streams, the attention and MLP projections (and an untied LM head),
shrink. `int8` keeps one scale per output row (minqwen.quant.int8); `int4` a step and zero point
per group of input weights (minqwen.quant.int4).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minqwen.model.qwen2 import Qwen2
from minqwen.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, ROWS_MULTIPLE, Int4Linear
from minqwen.quant.int8 import Int8Linear

SCHEMES = ("int8", "int4")
QUANTIZED_LAYERS = (Int8Linear, Int4Linear)
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def quantize(model: Qwen2, scheme: str = "int8", *, group_size: int | None = None) -> Qwen2:
    """Quantize a loaded `Qwen2`'s projections in place and return it.

    Every attention and MLP projection becomes an `Int8Linear` or `Int4Linear`. So does an untied
    LM head; a head tied to the embedding stays as it is, since quantizing it would make a second
    copy of the largest matrix. `group_size` (int4 only, default 128) is how many input weights
    share a step. Every argument is checked before any weight changes."""
    targets = layers_to_quantize(model, scheme, group_size)
    with torch.no_grad():
        for _, parent, name in targets:
            setattr(parent, name, quantized(getattr(parent, name), scheme, group_size))
    return model


def quantized(linear: nn.Linear, scheme: str, group_size: int | None) -> nn.Module:
    """One projection in `scheme`, its arguments already checked (by `layers_to_quantize`)."""
    if scheme == "int8":
        return Int8Linear(linear)
    return Int4Linear(linear, group_size or DEFAULT_GROUP_SIZE)


def format_bits(scheme: str, group_size: int | None, layers: list[nn.Module]) -> float:
    """Bits per weight that `scheme` stores for `layers`, scales and zero points included: int8 adds
    a float32 scale per output row, int4 a bfloat16 step and zero point per group."""
    if scheme == "int8":
        weights = sum(m.in_features * m.out_features for m in layers)
        return 8 + 32 * sum(m.out_features for m in layers) / weights
    return 4 + 32 / (group_size or DEFAULT_GROUP_SIZE)


def check_scheme(scheme: str, group_size: int | None) -> None:
    """A ValueError unless `scheme` and `group_size` go together: checked before a model loads."""
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}"
        )
    if scheme == "int8" and group_size is not None:
        raise ValueError("group_size is for int4; int8 has one scale per output row")
    if scheme == "int4" and group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}"
        )


def layers_to_quantize(
    model, scheme: str, group_size: int | None
) -> list[tuple[str, nn.Module, str]]:
    """The (full name, parent, name) of every layer to quantize, once the arguments are known to be good.

    It reads only shapes, so `Qwen2.from_pretrained` runs it on the empty model before loading."""
    check_scheme(scheme, group_size)
    if not isinstance(model, Qwen2):
        raise ValueError(f"quantize takes a minqwen Qwen2, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError(
            "this model is already quantized; load it again to quantize it another way"
        )
    if model.tensor_parallel is not None:
        raise ValueError(
            "this model is split across processes (tensor parallelism), which quantize does not "
            "support yet: quantize a model on one device"
        )
    targets = [
        (f"layers.{i}.{part}.{name}", getattr(layer, part), name)
        for i, layer in enumerate(model.layers)
        for part, names in PROJECTIONS.items()
        for name in names
    ]
    if not model.config.tie_word_embeddings:
        targets.append(("lm_head", model, "lm_head"))
    if scheme == "int4":
        size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        for full_name, parent, name in targets:
            linear = getattr(parent, name)
            if linear.in_features % size or linear.out_features % ROWS_MULTIPLE:
                raise ValueError(
                    f"int4 needs each layer's inputs in whole groups of {size} and its outputs in "
                    f"multiples of {ROWS_MULTIPLE}; {full_name} is {linear.out_features} x "
                    f"{linear.in_features}: choose a group size that divides {linear.in_features}, "
                    f"or use int8"
                )
    return targets


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_LAYERS) for m in model.modules())


def weight_of(layer: nn.Module):
    """What a product with `layer` reads: its float weight, or its quantized weight tuple."""
    return layer.quantized_weight() if isinstance(layer, QUANTIZED_LAYERS) else layer.weight


def fused_weight(layers: list[nn.Module]):
    """One weight holding the output rows of `layers` in order: q/k/v or gate/up as one product."""
    weights = [weight_of(layer) for layer in layers]
    if isinstance(weights[0], torch.Tensor):
        return torch.cat(weights)
    return type(weights[0]).concat(weights)
