"""Figures and tables of the sampling page (ch1/03)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import numpy as np
import torch

KEPT, DROPPED = "#3b75af", "#d9d9d9"


def filter_chain(stages: dict[str, torch.Tensor], labels: list[str], order: torch.Tensor) -> None:
    """The distribution after each stage of the chain, 2 x 3 panels, over the same most likely tokens.

    Blue bars: the probability a stage leaves each token; grey: the model's probability of a token the stage has
    filtered out."""
    model = next(iter(stages.values()))[0].softmax(-1)[order].numpy()
    fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.6), sharey=True)
    for ax, (name, logits) in zip(axes.flat, stages.items()):
        probs = logits[0].softmax(-1)[order].numpy()
        kept = torch.isfinite(logits[0][order]).numpy()
        x = np.arange(len(order))
        ax.bar(x, np.where(kept, probs, 0), color=KEPT, width=0.75)
        ax.bar(x, np.where(kept, 0, model), color=DROPPED, width=0.75)
        left = int(torch.isfinite(logits).sum())
        ax.set_title(f"{name}: {left:,} tokens left", fontsize=10, loc="left")
        ax.set_xticks(x, labels, rotation=90, fontsize=9)
        ax.tick_params(axis="y", labelsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability", fontsize=10)
    fig.tight_layout(h_pad=1.0, w_pad=0.6)
    show_figure(fig)


def draws(counts: torch.Tensor, target: torch.Tensor, labels: list[str], total: int) -> None:
    """Sampled frequency beside the probability each token should have."""
    order = target.argsort(descending=True)
    counts, target, labels = counts[order], target[order], [labels[i] for i in order]
    fig, ax = plt.subplots(figsize=(9.4, 3.4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, (counts / total).numpy(), width=0.4, label="sampled frequency", color="#3b75af")
    ax.bar(x + 0.2, target.numpy(), width=0.4, label="filtered probability", color="#f28e2b")
    ax.set_xticks(x, labels, rotation=90 if len(labels) > 8 else 0, fontsize=9)
    ax.set_ylabel("probability")
    ax.set_title(
        f"{total:,} seeded draws from the Instruct-default distribution", fontsize=10, loc="left"
    )
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=9, frameon=False)
    show_figure(fig)
