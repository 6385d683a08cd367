"""Figures of the hand-written decode kernels page (ch5/05)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd

KERNEL_LABELS = {
    "qkv": "norm + q/k/v + RoPE + cache",
    "o": "o projection + residual",
    "gate_up": "norm + gate/up + SwiGLU",
    "down": "down projection + residual",
}


def tiles(tune: pd.DataFrame) -> None:
    """µs per layer of each kernel against the weight rows a program reads (the best column block at each),
    one panel per model."""
    sizes = tune["size"].unique()
    fig, axes = plt.subplots(1, len(sizes), figsize=(10, 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        best = tune[tune["size"] == size].groupby(["kernel", "rows"], sort=False).us.min()
        for kernel, label in KERNEL_LABELS.items():
            ax.plot(best[kernel].index, best[kernel].values, "o-", ms=4, label=label)
        ax.set(xscale="log", xlabel="weight rows per program", ylabel="µs per layer", title=size)
        ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
        ax.minorticks_off()
        ax.set_ylim(0, None)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, ncol=4, loc="lower center", frameon=False)
    fig.suptitle("Each kernel over every layer's weights, by tile (H200, bf16)", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    show_figure(fig)


def tuned_table(tuned: dict) -> pd.DataFrame:
    """The engine's table of tiles as rows x columns per kernel, one row per (hidden, intermediate) shape."""
    return pd.DataFrame(
        {
            f"{hidden} / {intermediate}": {
                KERNEL_LABELS[kernel]: f"{tile.rows} × {tile.block_k}"
                for kernel, tile in blocks._asdict().items()
                if kernel in KERNEL_LABELS
            }
            for (hidden, intermediate), blocks in tuned.items()
        }
    ).T.rename_axis("hidden / intermediate")
