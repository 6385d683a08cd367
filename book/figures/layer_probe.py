"""Figures and tables of the layer-probe page (ch2/03)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd

from minqwen.tools import probe


def diff_frame(rows) -> pd.DataFrame:
    """One row per module (minqwen's name), the three diff numbers formatted; exact zeros print as 0."""
    frame = pd.DataFrame(probe.rows_as_dicts(rows)).set_index("minqwen")
    frame = frame.drop(columns=["hf", "shape"])
    return frame.map(lambda x: "0" if x == 0 else f"{x:.2e}")


def fault_table(forward, replayed, forward_tol: float, replay_tol: float) -> pd.DataFrame:
    """Per module of the whole forward: its relative error there and on replay, with a mark where over tolerance."""
    replay_rel = {r.minqwen: r.max_rel for r in replayed}

    def shown(x):
        return "0" if x == 0 else f"{x:.1e}"

    rows = {}
    for r in forward:
        again = replay_rel.get(r.minqwen)
        rows[r.minqwen] = {
            "whole forward": shown(r.max_rel),
            " ": "wrong" if r.max_rel > forward_tol else "",
            "replay on HF's inputs": "" if again is None else shown(again),
            "  ": "wrong" if again is not None and again > replay_tol else "",
        }
    return pd.DataFrame(rows).T


def fault_plot(forward, replayed, broken_layer: int, forward_tol: float) -> None:
    """Relative error per module, whole forward and replay, with the planted fault marked."""
    names = [r.minqwen for r in forward]
    replay_rel = {r.minqwen: r.max_rel for r in replayed}
    floor = 1e-9  # exact zeros are drawn on the floor of the log scale
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = range(len(names))
    ax.plot(
        x,
        [max(r.max_rel, floor) for r in forward],
        "o-",
        ms=4,
        label="whole forward: each layer gets minqwen's own input",
    )
    ax.plot(
        x,
        [max(replay_rel.get(n, floor), floor) for n in names],
        "s--",
        ms=4,
        label="replay: each layer gets HF's recorded input",
    )
    ax.axhline(forward_tol, color="gray", ls=":", lw=1)
    ax.text(0, forward_tol * 1.6, "tolerance", color="gray", fontsize=10)
    broken = names.index(f"layers.{broken_layer}")
    ax.axvspan(broken - 0.4, broken + 0.4, color="#f8dde6", zorder=0)
    ax.text(
        broken - 0.6,
        1e-7,
        f"k and v swapped\nin layer {broken_layer}",
        fontsize=10,
        ha="right",
        va="center",
    )
    labels = [n.removeprefix("layers.") for n in names]
    ax.set_xticks(list(x), labels, rotation=90, fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, 3)
    ticks = [floor, 1e-6, 1e-3, 1]
    ax.set_yticks(ticks, ["0 (exact)", "1e-6", "1e-3", "1"])
    ax.set(ylabel="max |Δ| / max |HF|", xlabel="module (decoder layers by index)")
    ax.set_title("Where the planted fault shows, padded batch of 3")
    ax.legend(loc="upper left", fontsize=10)
    show_figure(fig)
