"""Figures of the grouped-query attention page (ch3/03)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyBboxPatch

PREVIOUS, SINK = "tab:orange", "tab:cyan"


def head_groups(heads: int, kv_heads: int) -> None:
    """Which query heads read which kv head: h -> floor(h / (heads / kv_heads))."""
    group = heads // kv_heads
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(10, 2.6))
    width = 0.8

    def box(x, y, w, text, color):
        ax.add_patch(
            FancyBboxPatch(
                (x - w / 2, y - 0.25),
                w,
                0.5,
                boxstyle="round,pad=0.02",
                facecolor=color,
                alpha=0.35,
                edgecolor=color,
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=10)

    kv_x = [(g + 0.5) * group - 0.5 for g in range(kv_heads)]
    for h in range(heads):
        g = h // group
        box(h, 2, width, f"q{h}", colors[g % 10])
        ax.plot([h, kv_x[g]], [1.75, 0.75], color=colors[g % 10], lw=1)
    for g, x in enumerate(kv_x):
        box(x, 0.5, group * 0.8, f"kv head {g}: K and V, cached", colors[g % 10])
    ax.text(-0.8, 2, "query heads", ha="right", va="center", fontsize=10)
    ax.text(-0.8, 0.5, "kv heads", ha="right", va="center", fontsize=10)
    ax.set_xlim(-2.9, heads - 0.4)
    ax.set_ylim(0, 2.5)
    ax.axis("off")
    ax.set_title(
        f"GQA: {heads} query heads in {kv_heads} groups of {group}; "
        f"query head h reads kv head ⌊h / {group}⌋",
        fontsize=11,
    )
    show_figure(fig)


def _label(prev: float, sink: float, threshold: float) -> tuple[str, str | None]:
    names = [n for n, s in (("prev", prev), ("sink", sink)) if s > threshold]
    color = PREVIOUS if "prev" in names else SINK if names else None
    return " ".join(names), color


def attention_grid(
    weights: torch.Tensor,
    layers: list[int],
    prev: torch.Tensor,
    sink: torch.Tensor,
    threshold: float,
) -> None:
    """Every head of the chosen layers: weights [layers, heads, T, T], labelled heads framed."""
    heads = weights.shape[1]
    fig, axes = plt.subplots(
        len(layers), heads, figsize=(10.5, 0.95 * len(layers) + 0.6), squeeze=False
    )
    for row, layer in enumerate(layers):
        for h, ax in enumerate(axes[row]):
            ax.imshow(weights[layer, h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            text, color = _label(prev[layer, h].item(), sink[layer, h].item(), threshold)
            ax.set_title(f"{h} {text}".strip(), fontsize=9, pad=2)
            if color:
                for spine in ax.spines.values():
                    spine.set(color=color, linewidth=2.5)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=10)
    fig.suptitle(
        "attention weights of every head (query rows, key columns); "
        f"framed: previous-token (orange) or sink (cyan) score > {threshold}",
        fontsize=11,
    )
    fig.tight_layout(h_pad=0.4, w_pad=0.2)
    show_figure(fig)


def head_scores(prev: torch.Tensor, sink: torch.Tensor, threshold: float) -> None:
    """The two scores of every head, layers across, heads down; the heads over the threshold printed."""
    fig, axes = plt.subplots(2, 1, figsize=(10.5, 7.4))
    for ax, score, name, color in (
        (axes[0], prev, "previous-token score: mean weight on key i − 1", PREVIOUS),
        (axes[1], sink, "sink score: mean weight on key 0 (the first token)", SINK),
    ):
        image = ax.imshow(score.T, cmap="magma", vmin=0, vmax=1, aspect="auto")
        for layer, head in (score > threshold).nonzero().tolist():
            value = score[layer, head].item()
            ax.text(
                layer,
                head,
                f"{value:.2f}".lstrip("0"),
                ha="center",
                va="center",
                fontsize=9,
                color="black" if value > 0.6 else "white",
            )
        ax.set(xlabel="layer", ylabel="head")
        ax.set_xticks(range(score.shape[0]))
        ax.set_yticks(range(0, score.shape[1]))
        ax.tick_params(labelsize=9)
        ax.set_title(f"{name}; values shown where > {threshold}", fontsize=11, color=color)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    show_figure(fig)


def close_ups(maps: list[torch.Tensor], titles: list[str], tokens: list[str]) -> None:
    """Two heads side by side, every token labelled."""
    fig, axes = plt.subplots(1, len(maps), figsize=(10.5, 5.4))
    for ax, weights, title in zip(axes, maps, titles):
        ax.imshow(weights, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=9)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=9)
        ax.set_xlabel("key", fontsize=10)
        ax.set_title(title, fontsize=11)
    axes[0].set_ylabel("query", fontsize=10)
    fig.tight_layout()
    show_figure(fig)
