"""Figures and tables of the pipeline page (ch1/01)."""

from __future__ import annotations

from helpers import show_figure

import textwrap
import warnings

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import FancyBboxPatch

STAGE, DATA = "#dbe9f6", "#f6f6f6"
WRAP = 82  # monospace characters per line in the right-hand column


def wrap(text: str, width: int = WRAP) -> list[str]:
    """Lines of at most `width` characters, keeping the text's own line breaks."""
    lines = []
    for line in text.split("\n"):
        lines += textwrap.wrap(line, width, replace_whitespace=False) or [""]
    return lines


def stages(steps: list[tuple[str, str, str]]) -> None:
    """The stages of `pipeline()` top to bottom: each stage's name and call on the left, what it produced on the
    right. `steps` holds (stage, call, product); a step without a stage is the input."""
    blocks = [(stage, call, wrap(product)) for stage, call, product in steps]
    line = 0.34  # height of one 9-point line, in axis units
    heights = [max(len(lines) * line + 0.25, 0.95) for _, _, lines in blocks]
    gap = 0.35
    total = sum(heights) + gap * (len(blocks) - 1)
    fig = plt.figure(figsize=(9.6, 0.3 + total * 0.52))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 12), ylim=(-0.1, total + 0.1))
    ax.axis("off")
    y = total
    previous = None
    for (stage, call, lines), height in zip(blocks, heights):
        middle = y - height / 2
        if stage:
            ax.add_patch(
                FancyBboxPatch(
                    (0.1, middle - 0.38), 2.6, 0.76, boxstyle="round,pad=0.04", fc=STAGE, ec="0.35"
                )
            )
            ax.text(
                1.4, middle + 0.14, stage, ha="center", va="center", fontsize=10.5, weight="bold"
            )
            ax.text(
                1.4, middle - 0.17, call, ha="center", va="center", fontsize=9, family="monospace"
            )
        else:
            ax.text(1.4, middle, "input", ha="center", va="center", fontsize=10.5, weight="bold")
        ax.add_patch(
            FancyBboxPatch(
                (3.0, y - height + 0.05),
                8.9,
                height - 0.1,
                boxstyle="round,pad=0.02",
                fc=DATA,
                ec="0.7",
            )
        )
        ax.text(
            3.12,
            y - 0.14,
            "\n".join(lines),
            va="top",
            ha="left",
            fontsize=9,
            family="monospace",
            linespacing=1.3,
        )
        ax.annotate(
            "",
            xy=(2.95, middle),
            xytext=(2.72, middle),
            arrowprops=dict(arrowstyle="-|>", color="0.4"),
        )
        if previous is not None:
            ax.annotate(
                "",
                xy=(1.4, middle + 0.42),
                xytext=(1.4, previous - 0.42),
                arrowprops=dict(arrowstyle="-|>", color="0.3", lw=1.2),
            )
        previous = middle
        y -= height + gap
    with warnings.catch_warnings():  # a model's text may hold characters the plot font lacks
        warnings.simplefilter("ignore", UserWarning)
        show_figure(fig)


def settings_table(
    keys: list[str], transformers: dict, pipeline: dict, checkpoint: dict, resolved: dict
) -> pd.DataFrame:
    """Where each generation setting comes from: one row per setting, one column per layer of defaults, then
    what a call resolves to (`resolved` maps a column name to the settings it resolved)."""
    frame = pd.DataFrame(
        {
            "transformers": [transformers.get(k, "") for k in keys],
            "pipeline": [pipeline.get(k, "") for k in keys],
            "the file": [checkpoint.get(k, "") for k in keys],
            **{name: [settings.get(k, "") for k in keys] for name, settings in resolved.items()},
        },
        index=pd.Index(keys, name="setting"),
    )
    return frame.astype(str)
