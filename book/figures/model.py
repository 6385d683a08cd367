"""Figures of the whole-model page (ch3/06)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd


def error_through_the_layers(errors: pd.Series, budget: float) -> None:
    """Relative error of each module's output against float32, module by module."""
    # an exact zero (a bf16 embedding of bf16 weights) is drawn at the bottom of the axis
    floor = min(errors[errors > 0].min(), 2**-8) / 3
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.semilogy(range(len(errors)), errors.clip(lower=floor).values, marker="o", ms=4)
    ax.axhline(budget, color="gray", ls="--", lw=1)
    ax.text(0, budget * 0.85, f"budget {budget:g}", color="gray", fontsize=9, va="top")
    ax.axhline(2**-8, color="gray", ls=":", lw=1)
    ax.text(0.4, 2**-8 * 0.85, "2⁻⁸: one bf16 rounding", color="gray", fontsize=9, va="top")
    names = list(errors.index)
    ticks = [0, *range(1, len(names) - 2, 3), len(names) - 2, len(names) - 1]
    ax.set_xticks(ticks, [names[i] for i in ticks], fontsize=9, rotation=90)
    ax.set(xlabel="module output: embedding, decoder layers, final norm, LM head")
    ax.set_ylabel("max |Δ| / max |float32|")
    ax.set_ylim(floor, budget * 1.5)
    ax.set_title(f"{errors.name}, module by module")
    show_figure(fig)
