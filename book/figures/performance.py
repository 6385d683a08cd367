"""Figures of the performance page (ch4/05): the committed benchmark data, drawn."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd

COLORS = {
    "hf-eager": "C0",
    "hf-static-compile": "C1",
    "minqwen-eager": "C2",
    "minqwen-fast": "C3",
    "roofline": "black",
}
STYLES = {128: "-", 2048: "--"}


def roofline_fraction(fraction: pd.DataFrame, title: str) -> None:
    """Batch-1 decode tok/s of each implementation as a fraction of the bandwidth roofline, per model."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    fraction.plot.bar(ax=ax, rot=0, color=[COLORS[c] for c in fraction.columns], width=0.8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(xlabel="model", ylabel="fraction of the roofline", title=title, ylim=(0, 1.05))
    ax.legend(fontsize=9, loc="upper left")
    show_figure(fig)


def by_batch(
    cells: pd.DataFrame,
    column: str,
    ylabel: str,
    title: str,
    models=("0.5B", "7B"),
    weights=None,
    log_y: bool = True,
) -> None:
    """`column` against batch size for each implementation (solid: 128-token prompts, dashed: 2,048), one
    panel per model; `weights` {model: bytes} draws each model's weights as a grey line."""
    fig, axes = plt.subplots(1, len(models), figsize=(10.2, 3.9))
    for ax, model in zip(axes, models):
        mine = cells[cells.model == model]
        for impl, color in COLORS.items():
            for prompt, style in STYLES.items():
                line = mine[(mine.impl == impl) & (mine.prompt_len == prompt)].sort_values(
                    "batch_size"
                )
                if len(line) and line[column].notna().any():
                    ax.plot(
                        line.batch_size,
                        line[column],
                        style,
                        marker="o",
                        ms=3,
                        color=color,
                        label=f"{impl}, prompt {prompt}" if model == models[-1] else None,
                    )
        if weights is not None:
            ax.axhline(weights[model], color="0.6", lw=1, ls=":")
            ax.text(1, weights[model] * 0.96, "the weights", color="0.4", fontsize=9, va="top")
        ax.set(xscale="log", xlabel="batch size", title=f"{model}: {title}")
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, None)
        ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
    axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    show_figure(fig)


def intensity(batches, flops_per_byte, ridge: float, title: str) -> None:
    """Arithmetic intensity of a decode step against the batch, beside the card's ridge point."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(batches, flops_per_byte, marker="o", ms=3, label="decode step: FLOPs per byte read")
    ax.axhline(ridge, color="black", ls="--", lw=1, label="ridge: matmul rate / bandwidth")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="FLOPs per byte", title=title)
    ax.legend(fontsize=9)
    show_figure(fig)
