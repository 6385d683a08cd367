"""Figures of the int4 page (ch6/03): error against group size, the bits-quality trade-off, GPU decode speed."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def error_by_group_size(labels: list[str], rms: list[float]) -> None:
    """Root-mean-square rounding error of one matrix for one scale per row, then smaller groups."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bars = ax.bar(labels, rms, color=["C3"] + ["C0"] * (len(labels) - 1))
    ax.bar_label(bars, fmt="%.2e", fontsize=8)
    ax.set(
        ylabel="RMS error of the weights",
        title="Layer 0 gate projection in 4 bits: smaller groups, finer steps",
    )
    show_figure(fig)


def short_names(models: pd.Series) -> pd.Series:
    """ "Qwen2.5-Coder-0.5B-Instruct" as "0.5B", for tables and legends."""
    return models.str.removeprefix("Qwen2.5-Coder-").str.removesuffix("-Instruct")


def trade_off(quality: pd.DataFrame) -> None:
    """Perplexity over the float32 model's, and the KL divergence from it, against bits per projection weight."""
    fig, (cost_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (short, rows) in enumerate(quality.groupby(short_names(quality["model"]), sort=False)):
        base = rows[rows["scheme"] == "float32"].iloc[0]
        quantized = rows.dropna(subset=["bits_per_weight"]).sort_values("bits_per_weight")
        cost = 100 * (quantized["perplexity"] / base["perplexity"] - 1)
        for ax, y in ((cost_ax, cost), (kl_ax, quantized["kl_nats"])):
            ax.plot(quantized["bits_per_weight"], y, "o-", color=f"C{i}", label=short)
            for j, (bits, value, scheme) in enumerate(
                zip(quantized["bits_per_weight"], y, quantized["scheme"])
            ):
                ax.annotate(
                    scheme,
                    (bits, value),
                    fontsize=7,
                    color=f"C{i}",
                    textcoords="offset points",
                    xytext=(4, 6 if (i + j) % 2 else -12),
                )
        cost_ax.plot(
            base["gguf_bits_per_weight"],
            0,
            "*",
            ms=14,
            color=f"C{i}",
            label=f"{short}: the GGUF file's own mix, the reference",
        )
    cost_ax.axhline(0, color="black", lw=0.8)
    cost_ax.set(
        xlabel="bits per projection weight (scales and zero points included)",
        ylabel="perplexity over float32's (%)",
        title="Perplexity on textwrap.py",
    )
    kl_ax.set(
        xlabel="bits per projection weight",
        ylabel="mean KL divergence from float32 (nats)",
        yscale="log",
        title="How far the next-token distribution moves",
    )
    cost_ax.legend(fontsize=7)
    show_figure(fig)


def gpu_speedups(speedup: pd.DataFrame) -> None:
    """Decode speed of each variant over bf16's in the same run, batch 1, one group of bars per model size."""
    variants, sizes = list(speedup.columns), list(speedup.index)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, variant in enumerate(variants):
        x = np.arange(len(sizes)) + (i - (len(variants) - 1) / 2) * width
        bars = ax.bar(
            x,
            speedup[variant].fillna(0),
            width,
            label=variant,
            color=f"C{i}",
            hatch="//" if variant.startswith("torchao") else None,
        )
        ax.bar_label(
            bars, labels=[f"{v:.2f}" if v == v else "" for v in speedup[variant]], fontsize=7
        )
    ax.axhline(1, color="black", lw=1)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set(
        ylabel="decode speed / bf16's",
        title="Batch 1 decode on an H200, fast engine (hatched: torchao)",
    )
    ax.legend(fontsize=8, ncols=3)
    show_figure(fig)
