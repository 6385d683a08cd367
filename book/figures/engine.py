"""The figure of the closing page: the whole engine, each part marked with the page that built it."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# (label, what it does, page that built it, x, y)
PARTS = [
    ("chat template", "messages -> ChatML text", "3.1", 1.3, 4.2),
    ("tokenizer", "text -> ids (byte-level BPE)", "3.1", 1.3, 2.6),
    ("embedding", "ids -> vectors", "2.1, 3.6", 5.0, 2.6),
    ("decoder layers x N", "RMSNorm, GQA + RoPE, SwiGLU", "3.2-3.5", 5.0, 4.2),
    ("KV cache", "keys and values of the past", "4.1, 4.2", 5.0, 5.8),
    ("norm + LM head", "vector -> logits", "3.6", 8.7, 4.2),
    ("sampler", "penalty, T, top-k, top-p, min-p", "1.3", 8.7, 2.6),
    ("stream", "ids -> text, whole characters", "4.4", 8.7, 1.0),
    ("fast engine", "static cache, CUDA graphs", "4.5", 5.0, 1.0),
]
ARROWS = [
    ("chat template", "tokenizer", 0.0),
    ("tokenizer", "embedding", 0.0),
    ("embedding", "decoder layers x N", 0.0),
    ("decoder layers x N", "norm + LM head", 0.0),
    ("norm + LM head", "sampler", 0.0),
    ("sampler", "stream", 0.0),
]
HALF_WIDTH, HALF_HEIGHT = 1.55, 0.45


def whole_engine() -> None:
    """Boxes for the parts, arrows for the data, and the loop back from the sampler to the embedding."""
    fig, ax = plt.subplots(figsize=(10.5, 6.2))
    ax.set_xlim(-0.4, 10.4)
    ax.set_ylim(0.3, 6.5)
    ax.axis("off")
    centers = {}
    for label, role, page, x, y in PARTS:
        engine = label == "fast engine"
        ax.add_patch(
            FancyBboxPatch(
                (x - HALF_WIDTH, y - HALF_HEIGHT),
                2 * HALF_WIDTH,
                2 * HALF_HEIGHT,
                boxstyle="round,pad=0.04",
                facecolor="#f2f2f2" if engine else "#dbe9f6",
                edgecolor="0.35",
                linestyle="--" if engine else "-",
            )
        )
        ax.text(x, y + 0.12, label, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x, y - 0.2, role, ha="center", va="center", fontsize=9.5)
        ax.text(
            x + HALF_WIDTH,
            y + HALF_HEIGHT + 0.05,
            f"ch {page}",
            ha="right",
            va="bottom",
            fontsize=9,
            color="#c0392b",
        )
        centers[label] = (x, y)
    for start, end, _ in ARROWS:
        _arrow(ax, _edge(centers[start], centers[end]), _edge(centers[end], centers[start]))
    layer_top, cache_bottom = 4.2 + HALF_HEIGHT, 5.8 - HALF_HEIGHT
    _arrow(ax, (4.6, layer_top), (4.6, cache_bottom))
    _arrow(ax, (5.4, cache_bottom), (5.4, layer_top))
    ax.text(4.5, 5.0, "write", ha="right", va="center", fontsize=9)
    ax.text(5.5, 5.0, "read", ha="left", va="center", fontsize=9)
    _arrow(ax, (8.7 - HALF_WIDTH, 2.45), (5.0 + HALF_WIDTH, 2.45), color="#1f77b4")
    ax.text(
        6.85,
        2.3,
        "the new token goes round again",
        ha="center",
        va="top",
        fontsize=9.5,
        color="#1f77b4",
    )
    ax.text(
        5.0,
        0.3,
        "the same loop, replayed as one CUDA graph per step on a GPU",
        ha="center",
        va="bottom",
        fontsize=9,
        color="0.35",
    )
    ax.set_title("One new token: the path through minqwen, and the chapter that built each part")
    show_figure(fig)


def _arrow(ax, start, end, color="0.3") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=color))


def _edge(start, end):
    """The point where the line from `start` to `end` leaves the box centred on `start`."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    scale = min(
        HALF_WIDTH / abs(dx) if dx else float("inf"),
        HALF_HEIGHT / abs(dy) if dy else float("inf"),
    )
    return x0 + dx * scale, y0 + dy * scale
