"""Figures of the RMSNorm page (ch3/05)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd
import torch


def input_magnitudes(inputs: dict[str, torch.Tensor]) -> None:
    """Median RMS over tokens and the largest |x| of each norm's input, layer by layer."""
    names = list(inputs)
    rms = [x.float().pow(2).mean(-1).sqrt().median().item() for x in inputs.values()]
    peak = [x.float().abs().max().item() for x in inputs.values()]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.semilogy(rms, marker=".", label="median RMS over tokens")
    ax.semilogy(peak, marker=".", label="largest |x|")
    ax.axhline(256, color="gray", ls="--", lw=1)
    ax.text(
        len(names) - 1,
        200,
        "256: above this, x² overflows float16",
        color="gray",
        fontsize=9,
        ha="right",
        va="top",
    )
    ticks = list(range(0, len(names), 4)) + [len(names) - 1]
    ax.set_xticks(ticks, [names[i].removeprefix("layer ") for i in ticks])
    ax.set(xlabel="input of the norm before layer ... (last: the final norm)", ylabel="magnitude")
    ax.set_title("What RMSNorm receives: the residual stream grows through the layers")
    ax.set_ylim(top=max(peak) * 3)
    ax.legend(loc="lower right")
    show_figure(fig)


def upcast_errors(errors: pd.DataFrame, bound: float) -> None:
    """Relative error of each norm in bf16, with and without the float32 upcast, against float64."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for column, marker in zip(errors, "o^"):
        ax.semilogy(range(len(errors)), errors[column], marker=marker, ms=4, label=column)
    ax.axhline(bound, color="gray", ls="--", lw=1)
    ax.text(
        len(errors) - 1,
        bound * 1.15,
        "2⁻⁷: two bf16 roundings",
        color="gray",
        fontsize=9,
        ha="right",
    )
    ticks = list(range(0, len(errors), 4)) + [len(errors) - 1]
    ax.set_xticks(ticks, [errors.index[i].removeprefix("layer ") for i in ticks])
    ax.set(
        xlabel="norm before layer ... (last: the final norm)", ylabel="max |error| / max |exact|"
    )
    ax.set_title("RMSNorm in bf16 against float64, on the model's own hidden states")
    ax.legend(loc="lower left")
    show_figure(fig)
