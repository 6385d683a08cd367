"""Figures and tables of the prefill page (ch5/04), from the runs of scripts/gpu_prefill.py."""

from __future__ import annotations

from helpers import show_figure

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

STEPS = {
    "hf-eager": "HF eager",
    "copies": "fast engine before:\nkv heads copied",
    "gqa": "+ kv heads shared\n(enable_gqa)",
    "compiled": "+ compiled around\nattention",
    "graph": "+ one CUDA graph",
}
CLASSES = {
    "matmul": ("C0", "matrix products"),
    "attention": ("C3", "attention"),
    "compiled": ("C2", "compiled pointwise"),
    "other": ("C7", "other kernels"),
    "idle": ("0.85", "GPU idle between kernels"),
}


def load(paths: list[Path]) -> tuple[dict, pd.DataFrame]:
    """Each run's header by size, and every other line of the runs, `size` giving its run."""
    headers, rows = {}, []
    for path in paths:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        rows += lines[1:]
        headers[lines[1]["size"]] = lines[0]
    return headers, pd.DataFrame(rows)


def steps(frame: pd.DataFrame) -> None:
    """Prefill speed of each step as a share of the FLOP bound, one panel per model size."""
    sizes = list(dict.fromkeys(frame["size"]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(10, 3.6), sharey=True)
    for ax, size in zip(axes, sizes):
        rows = frame[frame["size"] == size].set_index("variant").loc[list(STEPS)]
        share = rows.tok_s / rows.flop_bound_tok_s * 100
        colors = ["0.6"] + ["C0"] * (len(STEPS) - 1)
        ax.bar(range(len(STEPS)), share, color=colors)
        for i, (value, rate) in enumerate(zip(share, rows.tok_s)):
            ax.text(i, value + 1.5, f"{rate / 1e3:,.0f}k", ha="center", fontsize=9)
        ax.set_xticks(range(len(STEPS)), list(STEPS.values()), fontsize=8, rotation=30, ha="right")
        ax.set(title=f"{size}, prompt {int(rows.prompt.iloc[0]):,}", ylim=(0, 100))
    axes[0].set_ylabel("% of the FLOP bound\n(labels: prompt tok/s)")
    fig.suptitle("Prefill on an H200, bf16, batch 1, each step added to the last", fontsize=11)
    fig.tight_layout()
    show_figure(fig)


def time_split(profiles: pd.DataFrame) -> pd.DataFrame:
    """Milliseconds of one prefill by kernel class, and the idle time between the first and last kernel."""
    table = profiles.set_index(["size", "variant"])
    table = table.assign(idle_us=table.span_us - table.busy_us)
    return pd.DataFrame({f"{kind} ms": table[f"{kind}_us"] / 1e3 for kind in CLASSES})


def where_time_goes(split: pd.DataFrame) -> None:
    """One stacked bar per (size, variant): the kernel classes and the idle gaps of one prefill."""
    fig, axes = plt.subplots(len(split.index.levels[0]), 1, figsize=(8, 3.6), sharex=True)
    for ax, (size, part) in zip(axes, split.groupby(level=0, sort=False)):
        part = part.droplevel(0)
        names = [STEPS[v].replace("\n", " ") for v in part.index]
        left = pd.Series(0.0, index=part.index)
        for kind, (color, label) in CLASSES.items():
            column = part[f"{kind} ms"]
            ax.barh(names, column, left=left, color=color, label=label, height=0.6)
            left += column
        ax.set_title(f"{size}: one prefill of 2,048 tokens", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.invert_yaxis()
    axes[-1].set_xlabel("ms (under the profiler)")
    axes[0].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, -0.3), frameon=False)
    fig.tight_layout()
    show_figure(fig)


def long_prompt(frame: pd.DataFrame) -> None:
    """Speed (relative to the whole prompt in one graph) and peak memory of a 30,000-token prefill against the
    chunk size, HF eager as a line."""
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (size, rows) in enumerate(frame.groupby("size", sort=False)):
        ours, hf = rows[rows.impl == "minqwen"], rows[rows.impl == "hf-eager"].iloc[0]
        whole = ours.tok_s.iloc[-1]
        color = f"C{i}"
        speed.plot(
            ours.chunk, ours.tok_s / whole * 100, "o-", color=color, label=f"{size}, minqwen"
        )
        speed.axhline(hf.tok_s / whole * 100, color=color, ls="--", lw=1, label=f"{size}, HF eager")
        memory.plot(
            ours.chunk, ours.peak_above_bytes / 2**30, "o-", color=color, label=f"{size}, minqwen"
        )
        memory.plot(
            ours.chunk, ours.cache_bytes / 2**30, ":", color=color, label=f"{size}, its KV cache"
        )
        memory.axhline(
            hf.peak_above_bytes / 2**30, color=color, ls="--", lw=1, label=f"{size}, HF eager"
        )
    chunks = sorted(frame.chunk.dropna().unique())
    for ax in (speed, memory):
        ax.set(xscale="log", xlabel="prefill chunk (tokens; 30,000 = the whole prompt)")
        ax.set_xticks(chunks, [f"{c:,.0f}" for c in chunks], fontsize=8)
        ax.minorticks_off()
    speed.set(ylabel="% of the whole prompt's tok/s", ylim=(0, 110))
    memory.set(ylabel="GiB above the weights", ylim=(0, None))
    speed.legend(fontsize=8, frameon=False)
    memory.legend(fontsize=8, frameon=False)
    fig.suptitle("A 30,000-token prompt on an H200, bf16", fontsize=11)
    fig.tight_layout()
    show_figure(fig)
