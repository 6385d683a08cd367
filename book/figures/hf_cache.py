"""Figures of the page on transformers' KV cache (ch4/01)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
from matplotlib.patches import Patch, Rectangle

SCORE, MASKED, WRITTEN, READ = "#9ecae1", "#f0f0f0", "#f4a460", "#c6dbef"


def _cell(ax, x, y, color, text="", hatch=None):
    ax.add_patch(Rectangle((x, y), 1, 1, facecolor=color, edgecolor="0.45", lw=0.8, hatch=hatch))
    if text:
        ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=9)


def prefill_and_decode(n: int = 6) -> None:
    """Prefill of an n-token prompt (n x n causal scores, n cache slots written) beside one decode step
    (one query row against n + 1 keys: n read from the cache, one written)."""
    fig, ax = plt.subplots(figsize=(10.4, 6.0))
    # Prefill: queries are rows (top to bottom), keys are columns.
    for q in range(n):
        for k in range(n):
            visible = k <= q
            _cell(ax, k, n - 1 - q, SCORE if visible else MASKED, "" if visible else "")
        ax.text(-0.2, n - 0.5 - q, f"q{q}", ha="right", va="center", fontsize=9)
    for k in range(n):
        ax.text(k + 0.5, n + 0.15, f"k{k}", ha="center", va="bottom", fontsize=9)
        _cell(ax, k, -2.2, WRITTEN, f"{k}")
    ax.text(n / 2, n + 0.9, f"Prefill: {n} prompt tokens in one pass", ha="center", fontsize=11)
    ax.text(
        n / 2,
        -0.55,
        f"{n} x {n} causal scores (upper triangle masked)",
        ha="center",
        va="center",
        fontsize=10,
    )
    ax.text(
        n / 2,
        -2.75,
        f"cache: {n} positions written",
        ha="center",
        va="top",
        fontsize=10,
    )

    # Decode: one new token at position n.
    x0 = n + 3
    for k in range(n + 1):
        _cell(ax, x0 + k, n - 1, SCORE)
        ax.text(x0 + k + 0.5, n + 0.15, f"k{k}", ha="center", va="bottom", fontsize=9)
        _cell(ax, x0 + k, -2.2, READ if k < n else WRITTEN, f"{k}")
        read = k < n
        ax.annotate(
            "",
            xy=(x0 + k + 0.5, n - 1.05) if read else (x0 + k + 0.5, -1.15),
            xytext=(x0 + k + 0.5, -1.15) if read else (x0 + k + 0.5, n - 1.05),
            arrowprops=dict(arrowstyle="->", color="0.55" if read else "#d2691e", lw=1.2),
        )
    ax.text(x0 - 0.2, n - 0.5, f"q{n}", ha="right", va="center", fontsize=9)
    ax.text(
        x0 + (n + 1) / 2,
        n + 0.9,
        f"Decode: token {n} alone, against the cache",
        ha="center",
        fontsize=11,
    )
    ax.text(
        x0 + (n + 1) / 2,
        n - 1.6,
        f"1 x {n + 1} scores: one query row",
        ha="center",
        va="center",
        fontsize=10,
        bbox=dict(facecolor="white", edgecolor="none", pad=1),
    )
    ax.text(
        x0 + (n + 1) / 2,
        -2.75,
        f"cache: {n} positions read, 1 written",
        ha="center",
        va="top",
        fontsize=10,
    )
    ax.legend(
        handles=[
            Patch(facecolor=SCORE, edgecolor="0.45", label="score computed (q · k)"),
            Patch(facecolor=MASKED, edgecolor="0.45", label="masked: a future key"),
            Patch(facecolor=WRITTEN, edgecolor="0.45", label="cache slot written"),
            Patch(facecolor=READ, edgecolor="0.45", label="cache slot read"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=4,
        fontsize=9,
        frameon=False,
    )
    ax.set_xlim(-1.2, x0 + n + 1.3)
    ax.set_ylim(-3.4, n + 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    show_figure(fig)


def cache_growth(contexts, sizes, per_token, weights, marked) -> None:
    """KV-cache GiB against context length for each size (bf16, batch 1), with the weights of `marked` sizes."""
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for size in sizes:
        (line,) = ax.plot(
            contexts,
            [per_token[size] * n / 2**30 for n in contexts],
            marker="o",
            ms=3,
            label=size,
        )
        if size in marked:
            ax.axhline(weights[size] / 2**30, color=line.get_color(), ls="--", lw=0.8)
            ax.text(
                contexts[0],
                weights[size] / 2**30 * 1.12,
                f"{size} weights",
                color=line.get_color(),
                fontsize=9,
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context length (tokens)",
        ylabel="KV cache, GiB (bf16, batch 1)",
        title="KV cache against context length; dashed: the weights of three sizes",
    )
    ax.set_xticks(contexts[::2], [f"{n // 1024}k" if n >= 1024 else str(n) for n in contexts[::2]])
    ax.legend(ncol=2, fontsize=9, title="Qwen2.5 size", title_fontsize=9, loc="lower right")
    show_figure(fig)
