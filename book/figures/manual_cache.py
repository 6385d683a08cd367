"""Figures of the page that builds minqwen's KV cache (ch4/02)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt


def step_times(cached: list[float], uncached: list[float], title: str) -> None:
    """Milliseconds of each decode step, with and without the cache."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for times, label in (
        (uncached, "no cache: the whole sequence"),
        (cached, "KV cache: one token"),
    ):
        ax.plot(range(1, len(times) + 1), [t * 1e3 for t in times], marker="o", ms=3, label=label)
    ax.set(xlabel="decode step", ylabel="ms per step", ylim=(0, None), title=title)
    ax.legend(loc="best")
    show_figure(fig)


def cache_memory(lengths: list[int], per_token: int, static_bytes: int, capacity: int) -> None:
    """MiB held by the growing cache at each length, beside the preallocated cache's fixed reservation."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(
        lengths,
        [n * per_token / 2**20 for n in lengths],
        marker="o",
        ms=3,
        label="DynamicKVCache (grows)",
    )
    ax.axhline(
        static_bytes / 2**20, color="gray", ls="--", label=f"StaticKVCache ({capacity} positions)"
    )
    ax.set(
        xlabel="positions in the cache",
        ylabel="MiB",
        title="KV cache memory during the decode above",
    )
    ax.legend(loc="lower right")
    show_figure(fig)
