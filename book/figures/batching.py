"""Figures of the batching page (ch4/03)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

REAL, PAD = "#9ecae1", "#d9d9d9"


def padded_batch(mask: torch.Tensor, positions: torch.Tensor, labels: list[str]) -> None:
    """The left-padded batch as a grid: one row per prompt, one column per position, padding grey, and in each
    real token's cell the position the model gives it."""
    rows, cols = mask.shape
    fig, ax = plt.subplots(figsize=(10.4, 0.55 * rows + 1.5))
    for r in range(rows):
        for c in range(cols):
            real = bool(mask[r, c])
            ax.add_patch(
                Rectangle(
                    (c, r),
                    1,
                    1,
                    facecolor=REAL if real else PAD,
                    edgecolor="white",
                    lw=1,
                    hatch=None if real else "///",
                )
            )
            if real and (positions[r, c] % 5 == 0 or c == cols - 1):
                ax.text(
                    c + 0.5, r + 0.5, int(positions[r, c]), ha="center", va="center", fontsize=9
                )
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_yticks([r + 0.5 for r in range(rows)], labels, fontsize=10)
    ticks = list(range(0, cols, 5))
    ax.set_xticks([c + 0.5 for c in ticks], ticks, fontsize=9)
    ax.set_xlabel(
        "column of the batch tensor (numbers in the cells: the token's position, every fifth)"
    )
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.legend(
        handles=[
            Patch(facecolor=REAL, label="real token: mask 1"),
            Patch(facecolor=PAD, hatch="///", label="left padding: mask 0"),
        ],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=2,
        fontsize=9,
        frameon=False,
    )
    show_figure(fig)


def attention_mask(allowed: torch.Tensor, padding: int, title: str) -> None:
    """One row's boolean attention mask [queries, keys]: visible keys, the causal triangle, padded keys, and the
    diagonal that lets a padding query see itself."""
    n = allowed.shape[0]
    query = np.arange(n)[:, None]
    key = np.arange(n)[None, :]
    kind = np.full((n, n), 1)  # future key: masked by causality
    kind[(key < padding) & (key <= query)] = 2  # padding key: masked by the padding mask
    kind[allowed.cpu().numpy()] = 0  # visible
    kind[(query < padding) & (key == query)] = 3  # padding query sees itself only
    colors = ["#3182bd", "#f0f0f0", "#fdae6b", "#756bb1"]
    fig, ax = plt.subplots(figsize=(7.2, 6.4))
    ax.imshow(kind, cmap=ListedColormap(colors), vmin=0, vmax=3, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set(xlabel="key (column)", ylabel="query (column)", title=title)
    ax.legend(
        handles=[
            Patch(facecolor=colors[0], label="visible"),
            Patch(facecolor=colors[1], edgecolor="0.7", label="masked: future key"),
            Patch(facecolor=colors[2], label="masked: padding key"),
            Patch(facecolor=colors[3], label="padding query sees itself"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=9,
        frameon=False,
    )
    show_figure(fig)
