"""Figures of the explicit-loop page (ch1/02)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

MODEL, SCORES, CHOICE, STOP = "#dbe9f6", "#fde5cc", "#dff2df", "#f8dde6"


def _box(ax, x, y, title, color, note, width=2.7, height=0.75, above=False):
    ax.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0.05",
            fc=color,
            ec="0.35",
        )
    )
    ax.text(x, y, title, ha="center", va="center", fontsize=11, weight="bold")
    if above:
        ax.text(
            x, y + height / 2 + 0.12, note, ha="center", va="bottom", fontsize=9, linespacing=1.3
        )
    else:
        ax.text(x, y - height / 2 - 0.12, note, ha="center", va="top", fontsize=9, linespacing=1.3)


def _arrow(ax, a, b, text="", rad=0.0, color="0.3", offset=(0, 0.12)):
    ax.add_patch(
        FancyArrowPatch(
            a,
            b,
            arrowstyle="-|>",
            mutation_scale=14,
            color=color,
            lw=1.3,
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if text:
        ax.text(
            (a[0] + b[0]) / 2 + offset[0],
            (a[1] + b[1]) / 2 + offset[1],
            text,
            ha="center",
            va="bottom",
            fontsize=9,
            color=color,
        )


def generate_loop(step: dict) -> None:
    """The greedy loop as a cycle of six stages, each labelled with what it held at one real step.

    `step` holds: prompt (ids fed), vocab, seen (distinct tokens penalised), penalty, winner (id, text),
    runner (the best token without the penalty, if different), eos (ids), steps (how many ran), last (text of
    the final token), and stopped (why the loop ended)."""
    fig = plt.figure(figsize=(9.6, 3.9))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(-0.5, 12), ylim=(0.1, 6.2))
    ax.axis("off")
    top, bottom = 4.3, 2.4
    xs = (1.7, 6.0, 10.3)
    _box(
        ax,
        xs[0],
        top,
        "forward",
        MODEL,
        f"model(ids): {step['prompt']} ids in,\nevery position recomputed",
        above=True,
    )
    _box(
        ax,
        xs[1],
        top,
        "logits",
        MODEL,
        f"of the last position:\n{step['vocab']:,} scores in float32",
        above=True,
    )
    _box(
        ax,
        xs[2],
        top,
        "processors",
        SCORES,
        f"repetition penalty {step['penalty']} on\nthe {step['seen']} distinct tokens seen",
        above=True,
    )
    _box(ax, xs[2], bottom, "pick", CHOICE, f"argmax: id {step['winner']}\n{step['runner']}")
    _box(ax, xs[1], bottom, "append", CHOICE, f"ids: {step['prompt']} -> {step['prompt'] + 1}")
    _box(
        ax,
        xs[0],
        bottom,
        "stop?",
        STOP,
        f"is the id in {list(step['eos'])},\nor max_new_tokens reached?",
    )
    _arrow(ax, (xs[0] + 1.4, top), (xs[1] - 1.4, top))
    _arrow(ax, (xs[1] + 1.4, top), (xs[2] - 1.4, top))
    _arrow(ax, (xs[2], top - 0.42), (xs[2], bottom + 0.42))
    _arrow(ax, (xs[2] - 1.4, bottom), (xs[1] + 1.4, bottom))
    _arrow(ax, (xs[1] - 1.4, bottom), (xs[0] + 1.4, bottom))
    _arrow(ax, (xs[0], bottom + 0.42), (xs[0], top - 0.42))
    ax.text(xs[0] + 0.12, (top + bottom) / 2, "no: next step", ha="left", va="center", fontsize=9.5)
    ax.text(xs[2] + 0.12, (top + bottom) / 2, "scores", ha="left", va="center", fontsize=9.5)
    exit_color = "#a0304a"
    _arrow(ax, (xs[0] - 1.4, bottom), (-0.3, 0.55), color=exit_color)
    ax.text(
        -0.1,
        0.45,
        f"yes: after {step['steps']} steps, {step['stopped']}",
        ha="left",
        va="center",
        fontsize=9.5,
        color=exit_color,
        weight="bold",
    )
    show_figure(fig)
