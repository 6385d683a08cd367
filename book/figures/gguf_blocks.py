"""Figures of the GGUF block-format page (ch6/01): one block's bytes per format, and one matrix quantized twice."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import numpy as np

# format: the fields of one block, in byte order, as (label, bytes, colour)
LAYOUTS = {
    "Q8_0": [("d", 2, "C3"), ("32 int8 values", 32, "C0")],
    "Q5_0": [("d", 2, "C3"), ("high bits", 4, "C1"), ("32 low nibbles", 16, "C0")],
    "Q4_K": [
        ("d", 2, "C3"),
        ("dmin", 2, "C4"),
        ("8 scales + 8 mins, 6 bits", 12, "C2"),
        ("256 4-bit values", 128, "C0"),
    ],
    "Q6_K": [
        ("256 low nibbles", 128, "C0"),
        ("high 2 bits", 64, "C1"),
        ("16 int8 scales", 16, "C2"),
        ("d", 2, "C3"),
    ],
}


def block_layouts(values: dict[str, int]) -> None:
    """Each format's block as a bar of its bytes (one panel each, so every block fills the width), with its fields
    labelled and its bits per value."""
    fig, axes = plt.subplots(len(LAYOUTS), 1, figsize=(10, 6))
    for ax, (fmt, fields) in zip(axes, LAYOUTS.items()):
        total = sum(size for _, size, _ in fields)
        start, small = 0, 0
        for label, size, color in fields:
            ax.barh(0, size, left=start, color=color, edgecolor="white", height=1)
            text = f"{label} ({size} B)"
            middle = start + size / 2
            if size / total >= 0.25:
                ax.text(middle, 0, text, ha="center", va="center", fontsize=9, color="white")
            else:
                # Narrow fields are labelled above the bar, one line each, so that neighbours do not collide.
                ax.annotate(
                    text,
                    (middle, 0.5),
                    xytext=(middle, 0.75 + 0.55 * small),
                    ha="right" if start > total / 2 else "left",
                    va="bottom",
                    fontsize=9,
                    arrowprops={"arrowstyle": "-", "lw": 0.6},
                )
                small += 1
            start += size
        ax.set_xlim(0, total)
        ax.set_ylim(-0.5, 2.3)
        ax.set_yticks([])
        ax.set_ylabel(fmt, rotation=0, ha="right", va="center", fontsize=10)
        bits = 8 * total / values[fmt]
        ax.set_title(
            f"{total} bytes for {values[fmt]} values: {bits:.4g} bits each", fontsize=9, loc="right"
        )
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel("byte within the block (each panel is one whole block)")
    fig.suptitle("One block of each format in the book's GGUF file")
    fig.tight_layout()
    show_figure(fig)


def twice_quantized(steps: np.ndarray) -> None:
    """Histogram of the Q5_0 embedding minus the Q8_0 head, in units of each Q5_0 block's step d."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.hist(steps, bins=np.linspace(-1.1, 1.1, 89), color="C0")
    for edge in (-0.5, 0.5):
        ax.axvline(edge, color="black", ls="--", lw=1)
    ax.set(
        xlabel="(embedding - LM head) / the embedding block's step d",
        ylabel="weights",
        title="One matrix, quantized twice",
        yscale="log",
    )
    show_figure(fig)
