"""Figures of the int8 page (ch6/02): the rounding error, and where quantization changes the top token."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import numpy as np


def rounding_error(in_steps: np.ndarray) -> None:
    """Histogram of (dequantized - original) / scale over one matrix: flat between -1/2 and 1/2."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.hist(in_steps, bins=np.linspace(-0.6, 0.6, 61), color="C0")
    for edge in (-0.5, 0.5):
        ax.axvline(edge, color="black", ls="--", lw=1)
    ax.set(
        xlabel="rounding error, in steps of the row's scale",
        ylabel="weights",
        title="Layer 0 gate projection, int8 per channel",
    )
    show_figure(fig)


def changes_by_confidence(confidence: np.ndarray, changed: np.ndarray) -> None:
    """Share of positions whose top token changes, by the original model's top probability."""
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(confidence, edges) - 1, 0, 9)
    share = [changed[which == b].mean() if (which == b).any() else 0.0 for b in range(10)]
    count = [(which == b).sum() for b in range(10)]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(edges[:-1] + 0.05, share, width=0.09, color="C3")
    for x, s, n in zip(edges[:-1] + 0.05, share, count):
        ax.text(x, s, f"{n}", ha="center", va="bottom", fontsize=8)
    ax.set(
        xlabel="the float32 model's probability of its top token",
        ylabel="share whose top token changes",
        title="Where int8 changes the most likely token (numbers: positions in each bin)",
        xlim=(0, 1),
    )
    show_figure(fig)
