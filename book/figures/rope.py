"""Figures of the RoPE page (ch3/02)."""

from __future__ import annotations

from helpers import show_figure

import math

import matplotlib.pyplot as plt
import torch


def frequencies(inv_freq: torch.Tensor, cos: torch.Tensor, trained: int, shown: int = 256) -> None:
    """Left: the wavelength of each pair. Right: cos(m θ_i) for the first `shown` positions."""
    pairs = len(inv_freq)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=(1, 1.25))
    left.semilogy(2 * math.pi / inv_freq, marker=".")
    left.axhline(trained, color="gray", ls="--", lw=1)
    left.text(0, trained * 1.6, f"{trained:,} trained positions", color="gray", fontsize=9)
    left.set(xlabel="pair i", ylabel="wavelength 2π/θᵢ (positions)")
    left.set_title("one turn of pair i takes 2π/θᵢ positions")
    image = right.imshow(
        cos[:shown, :pairs].T,
        aspect="auto",
        cmap="RdBu",
        vmin=-1,
        vmax=1,
        origin="lower",
        interpolation="nearest",
    )
    right.set(xlabel="position m", ylabel="pair i")
    right.set_title("cos(m θᵢ): fast pairs spin, slow pairs drift")
    fig.colorbar(image, ax=right, fraction=0.05)
    fig.tight_layout()
    show_figure(fig)


def table_error(error: torch.Tensor, bound: torch.Tensor, limit: float) -> None:
    """Largest |cos - exact| over pairs, at every position, with the rounding bound."""
    positions = torch.arange(1, len(error))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.loglog(positions, error[1:], lw=0.5, label="float32 table, max over pairs")
    ax.loglog(positions, bound[1:], color="black", lw=1, label="bound: m θ₀ 2⁻²³ + 10⁻⁶")
    ax.axhline(limit, color="gray", ls="--", lw=1, label=f"{limit:.0e}")
    ax.set(xlabel="position m", ylabel="|cos − exact cos|")
    ax.set_title("float32 RoPE tables against exact arithmetic: the error grows with the angle")
    ax.legend(loc="upper left")
    show_figure(fig)


def distance_scores(scores: torch.Tensor) -> None:
    """q·k after RoPE for one query and one key placed at every pair of positions."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(1, 1.4))
    limit = scores.abs().max().item()
    image = left.imshow(scores, cmap="RdBu", vmin=-limit, vmax=limit)
    left.set(xlabel="key position n", ylabel="query position m")
    left.set_title("q·k after RoPE")
    fig.colorbar(image, ax=left, fraction=0.046)
    size = scores.shape[0]
    for m in range(0, size, 8):
        n = torch.arange(m + 1)
        right.plot(m - n, scores[m, : m + 1], marker=".", ms=3, lw=0.8, label=f"m = {m}")
    right.set(xlabel="distance m − n", ylabel="q·k")
    right.set_title("every row, against the distance: one curve")
    right.legend(fontsize=9, ncol=2)
    fig.tight_layout()
    show_figure(fig)


def yarn_ratio(ratio: torch.Tensor, factor: float) -> None:
    """YaRN's frequency over the plain one, pair by pair, with the three regions shaded."""
    pairs = torch.arange(len(ratio))
    kept = ratio == 1
    slowed = torch.isclose(ratio, torch.tensor(1 / factor))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(pairs, ratio, marker=".", color="black")
    for mask, color, label in (
        (kept, "tab:green", "kept: rᵢ = 0"),
        (~kept & ~slowed, "tab:orange", "blended: 0 < rᵢ < 1"),
        (slowed, "tab:blue", f"interpolated: rᵢ = 1, θᵢ / {factor:g}"),
    ):
        if mask.any():
            chosen = pairs[mask]
            ax.axvspan(chosen.min() - 0.5, chosen.max() + 0.5, color=color, alpha=0.2, label=label)
    ax.set(xlabel="pair i", ylabel="θ′ᵢ / θᵢ")
    ax.set_title(f"YaRN with s = {factor:g}: fast pairs kept, slow pairs slowed by s")
    ax.legend(loc="lower left")
    show_figure(fig)
