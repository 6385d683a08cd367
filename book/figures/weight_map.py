"""Figures and tables of the weight-map page (ch2/02)."""

from __future__ import annotations

from helpers import show_figure

import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.patches import ConnectionPatch
from safetensors import safe_open

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
ATTENTION, MLP, NORM, VOCAB, LAYER = "#fde5cc", "#dbe9f6", "#dff2df", "#c9d9ee", "#f8dde6"


def header_table(checkpoints: list[Path]) -> pd.DataFrame:
    """One row per tensor of the checkpoint files, read from their headers only: shape, dtype, parameters, bytes."""
    rows = []
    for checkpoint in checkpoints:
        with safe_open(checkpoint, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = DTYPES[piece.get_dtype()]
                shape = tuple(piece.get_shape())
                numel = torch.Size(shape).numel()
                rows.append(
                    {
                        "key": key,
                        "shape": shape,
                        "dtype": str(dtype).removeprefix("torch."),
                        "parameters": numel,
                        "bytes": numel * dtype.itemsize,
                    }
                )
    return pd.DataFrame(rows).set_index("key")


def layer_of(key: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for the tensors outside the layers."""
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return int(match[1]) if match else None


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Shapes as `a x b`, counts with thousands separators."""
    shown = frame.copy()
    if "shape" in shown:
        shown["shape"] = shown["shape"].map(lambda s: " x ".join(map(str, s)))
    for column in ("parameters", "bytes"):
        if column in shown:
            shown[column] = shown[column].map(lambda n: f"{n:,}")
    return shown


def _segments(ax, parts, y, height=0.6, min_label=0.045):
    """Draw `parts` [(label, size, color)] as one stacked bar; label the segments wide enough."""
    total = sum(size for _, size, _ in parts)
    left = 0.0
    for label, size, color in parts:
        ax.barh(y, size, left=left, height=height, color=color, edgecolor="0.35", lw=0.6)
        if size / total >= min_label and label:
            ax.text(left + size / 2, y, label, ha="center", va="center", fontsize=10)
        left += size
    ax.set_xlim(0, total)
    ax.set_ylim(y - 0.5, y + 0.5)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def where_the_bytes_go(weights: pd.DataFrame, layers: int) -> None:
    """The checkpoint as one bar of MiB, and decoder layer 0 zoomed in below it."""
    mib = weights["bytes"] / 2**20
    layer = weights.index.map(layer_of)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.4), gridspec_kw={"hspace": 0.55})

    per_layer = mib.groupby(layer).sum()
    parts = [("embedding", mib["model.embed_tokens.weight"], VOCAB)]
    parts += [(f"layer {i}", per_layer[i], LAYER) for i in range(layers)]
    parts += [("", mib["model.norm.weight"], NORM)]
    if "lm_head.weight" in mib:
        parts += [("LM head", mib["lm_head.weight"], VOCAB)]
    _segments(top, [(n if "layer" not in n else "", s, c) for n, s, c in parts], 0)
    start = mib["model.embed_tokens.weight"]
    end = start + per_layer.sum()
    top.text(
        (start + end) / 2,
        0,
        f"{layers} decoder layers, {per_layer[0]:.1f} MiB each",
        ha="center",
        va="center",
        fontsize=10,
        bbox=dict(facecolor=LAYER, edgecolor="none"),
    )
    top.set_title(f"the whole checkpoint: {mib.sum():,.0f} MiB", fontsize=11, loc="left", pad=24)
    top.xaxis.tick_top()
    top.spines["bottom"].set_visible(False)
    top.spines["top"].set_visible(True)

    def part(name):
        keys = [k for k in mib.index if k.startswith(f"model.layers.0.{name}.")]
        return mib[keys].sum()

    inner = [
        ("", part("input_layernorm"), NORM),
        ("q", part("self_attn.q_proj"), ATTENTION),
        ("", part("self_attn.k_proj"), ATTENTION),
        ("", part("self_attn.v_proj"), ATTENTION),
        ("o", part("self_attn.o_proj"), ATTENTION),
        ("", part("post_attention_layernorm"), NORM),
        ("gate_proj", part("mlp.gate_proj"), MLP),
        ("up_proj", part("mlp.up_proj"), MLP),
        ("down_proj", part("mlp.down_proj"), MLP),
    ]
    _segments(bottom, inner, 0, min_label=0.04)
    attention = sum(s for _, s, c in inner if c == ATTENTION)
    mlp = sum(s for _, s, c in inner if c == MLP)
    k_at = part("input_layernorm") + part("self_attn.q_proj")
    bottom.annotate(
        f"k_proj, v_proj: {part('self_attn.k_proj'):.2f} MiB each",
        xy=(k_at + part("self_attn.k_proj"), 0.3),
        xytext=(k_at + 2.5, 0.62),
        ha="left",
        fontsize=10,
        arrowprops=dict(arrowstyle="-", color="0.4"),
        annotation_clip=False,
    )
    norms = part("input_layernorm") + part("post_attention_layernorm")
    bottom.set_xlabel(
        f"MiB. Layer 0: attention {attention:.1f} MiB, MLP {mlp:.1f} MiB,"
        f" its two norms {norms * 1024:.0f} KiB",
        fontsize=11,
    )
    x0, x1 = start, start + per_layer[0]
    for xa, xb in ((x0, 0), (x1, per_layer[0])):
        fig.add_artist(
            ConnectionPatch(
                xyA=(xa, -0.3),
                coordsA=top.transData,
                xyB=(xb, 0.3),
                coordsB=bottom.transData,
                ls=":",
                color="0.4",
            )
        )
    show_figure(fig)


def quantization_traces(row_cosine: torch.Tensor, steps: dict[str, torch.Tensor]) -> None:
    """Left: cosine of each embedding row with its head row. Right: quantization steps per 32-weight block."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.3))
    axes[0].hist(row_cosine.numpy(), bins=60, color="#4c72b0")
    axes[0].set(title="cosine(E row, H row), every token", xlabel="cosine", ylabel="tokens")
    for (name, v), color in zip(steps.items(), ("#dd8452", "#55a868")):
        axes[1].hist(v.numpy(), bins=range(0, 257, 4), color=color, alpha=0.7, label=name)
    axes[1].set(
        title="steps spanned per 32-weight block", xlabel="steps", ylabel="blocks", yscale="log"
    )
    axes[1].legend()
    fig.tight_layout()
    show_figure(fig)
