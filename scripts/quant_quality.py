"""What weight-only quantization costs on real weights: perplexity, KL divergence and top-1 agreement.

For each embedded model (Qwen2.5-Coder 0.5B and 1.5B Instruct, whose float32 weights are the book's GGUF
files dequantized), and each scheme (float32 as loaded, bf16, int8, int4 at group sizes 32, 64 and 128), one
forward pass over the held-out text: the first 1,024 tokens of Python's own `textwrap.py`. With `--schemes` naming
`torchao-int8`, `torchao-int4-g<G>` or `torchao-hqq-int4-g<G>`, the same projections are quantized by torchao, the
reference library (it must be importable): int8 through its own `Int8WeightOnlyConfig`, int4 through the
primitives its `Int4WeightOnlyConfig` uses (tinygemm's grid, from bfloat16 weights; with `hqq`, the grid its HQQ
option fits by half-quadratic optimization) and dequantized, because its int4 kernels need CUDA; quality depends on
the grid, not on the kernel. One JSON line per
(model, scheme) with the three numbers against the float32 model, the bits each projection weight takes (its
scales and zero points included) and, for the GGUF mix, those of the file's own formats. Chapter 6 plots the
committed lines; the page recomputes the 0.5B int4 point and checks it against them.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import platform
import textwrap
from pathlib import Path

import torch
from gguf import GGUFReader

import minqwen
from minqwen.quant.gguf_blocks import BLOCK_FORMATS
from minqwen.quant.int4 import Int4Linear
from minqwen.quant.int8 import Int8Linear
from minqwen.quant.weight_only import format_bits, layers_to_quantize
from minqwen.weights import EMBEDDED, cache_dir, fetch

SCHEMES = ("float32", "bfloat16", "int8", "int4-g32", "int4-g64", "int4-g128")
TEXT_TOKENS = 1024


def held_out_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(inspect.getsource(textwrap))[:TEXT_TOKENS]])


def variant(model, scheme: str):
    if scheme == "float32":
        return model
    if scheme == "bfloat16":
        return copy.deepcopy(model).to(torch.bfloat16)
    name, _, group = scheme.partition("-g")
    if name.startswith("torchao-"):
        return torchao_variant(copy.deepcopy(model), name, int(group) if group else None)
    return minqwen.quantize(copy.deepcopy(model), name, group_size=int(group) if group else None)


def torchao_variant(model, name: str, group_size: int | None):
    """The projections `minqwen.quantize` would take, quantized by torchao instead."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _choose_qparams_and_quantize_affine_hqq,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    hqq = name.startswith("torchao-hqq-")
    targets = layers_to_quantize(model, name.rpartition("-")[2], group_size)
    if name == "torchao-int8":
        chosen = {full_name for full_name, _, _ in targets}
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _, fqn: fqn in chosen)
        return model
    block = (1, group_size)
    for _, parent, attr in targets:
        weight = getattr(parent, attr).weight
        w = weight.detach().to(torch.bfloat16)
        if hqq:
            # The call torchao's int4 tensor makes for its HQQ option, in tinygemm's form of the grid.
            q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
                w, nbits=4, group_size=group_size, axis=1, compute_dtype=w.dtype, device=w.device
            )
            rows = w.shape[0]
            grid = _dequantize_affine_tinygemm(
                q.to(torch.int32),
                block,
                scale.view(rows, -1),
                zero.view(rows, -1),
                torch.int32,
                0,
                15,
            )
            weight.data = grid.to(weight.dtype)
            continue
        scale, zero = _choose_qparams_affine_tinygemm(
            w,
            MappingType.ASYMMETRIC,
            block,
            torch.int32,
            0,
            15,
            scale_dtype=torch.bfloat16,
            zero_point_dtype=torch.bfloat16,
        )
        q = _quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
        grid = _dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15)
        weight.data = grid.to(weight.dtype)
    return model


def quality(log_p: torch.Tensor, log_q: torch.Tensor, ids: torch.Tensor) -> dict:
    """Perplexity of `log_q` on the text, and its mean KL divergence and top-1 agreement with `log_p`."""
    following = ids[0, 1:, None]
    return {
        "perplexity": math.exp(-log_q[:-1].gather(1, following).mean()),
        "kl_nats": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        "top1_agreement": (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item(),
    }


def projection_bits(model, scheme: str) -> float | None:
    """Bits per weight of the quantized projections, their scales and zero points included. torchao
    stores what minqwen's formats store: a float32 scale per row for int8, a bfloat16 scale and zero
    per group for int4."""
    if scheme.startswith("torchao-"):
        name, _, group = scheme.removeprefix("torchao-").removeprefix("hqq-").partition("-g")
        layers = [
            getattr(parent, attr) for _, parent, attr in layers_to_quantize(model, "int8", None)
        ]
        return format_bits(name, int(group) if group else None, layers)
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            bits += 8 * m.weight_int8.numel() + 32 * m.scales.numel()
        elif isinstance(m, Int4Linear):
            bits += 8 * m.weight_int4.numel() + 16 * m.scales_and_zeros.numel()
        else:
            continue
        weights += m.in_features * m.out_features
    return bits / weights if weights else None


def gguf_projection_bits(path: Path) -> float:
    """Bits per weight of the GGUF file's attention and MLP matrices, in their own block formats."""
    bits = weights = 0
    for tensor in GGUFReader(path).tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            values, size = BLOCK_FORMATS[tensor.tensor_type.name]
            bits += 8 * size * tensor.n_elements / values
            weights += tensor.n_elements
    return bits / weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="embedded,embedded-1.5b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    args = p.parse_args()
    torch.manual_seed(0)
    for source in args.models.split(","):
        folder = fetch(source)
        model = minqwen.Qwen2.from_pretrained(folder)
        ids = held_out_ids(minqwen.BPETokenizer.from_file(folder))
        with torch.no_grad():
            log_p = model(ids).float().log_softmax(-1)[0]
            for scheme in args.schemes.split(","):
                quantized = variant(model, scheme)
                log_q = quantized(ids).float().log_softmax(-1)[0]
                record = {
                    "model": EMBEDDED[source].name,
                    "scheme": scheme,
                    "tokens": ids.shape[1],
                    "text": "textwrap.py (Python standard library)",
                    **quality(log_p, log_q, ids),
                    "bits_per_weight": projection_bits(quantized, scheme),
                    "gguf_bits_per_weight": gguf_projection_bits(
                        cache_dir() / "gguf" / EMBEDDED[source].gguf_name
                    ),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                }
                print(json.dumps(record), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                # Let this variant go before the next is built: two quantized copies of the 1.5B besides the
                # float32 model, and HQQ's float32 temporaries for its head, do not fit in 24 GB.
                del quantized, log_q


if __name__ == "__main__":
    main()
