"""Figures and tables of the decode-profile page (ch5/01): one decode step, kernel by kernel."""

from __future__ import annotations

from helpers import show_figure

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

# What each kernel of the fast engine's decode step does, recognised by the operations inductor names it after
# (its numeric suffixes change between compilations, so they are not used), or the hand-written kernels by
# their own names (ch5/05). The first pattern a name contains wins. Two roles alternate within a layer: the norm + projection kernels (q/k/v, then gate/up) and the cuBLAS
# products of attention (q·K, then p·V).
ROLES = [
    ("_qkv", "norm + q/k/v projection + RoPE + cache write", "weights"),
    ("_gate_up", "norm + gate/up projection + SwiGLU", "weights"),
    ("_project_add", "projection + residual", "weights"),
    ("_attend_part", "split attention: the parts", "attention"),
    ("_merge_parts", "split attention: merge kernel", "attention"),
    ("amax_exp", "split attention: merge maxima", "attention"),
    ("exp_mul_select_sub_sum", "split attention: merge sums", "attention"),
    ("div_mul_slice_sum", "merge division + o projection + residual", "weights"),
    ("embedding", "embedding row", "step"),
    ("cos_mul_sin", "RoPE angles", "step"),
    ("arange_bitwise_and_le", "visible slots", "step"),
    ("select_sum", "final norm + LM head", "weights"),
    ("mean_pow_select", "final norm statistics", "step"),
    ("silu", "SiLU(gate)·up + down projection", "weights"),
    ("rsqrt_sum", "norm + projection", "weights"),
    ("bmm_mul_sum", "p·V + o projection + residual", "weights"),
    ("mul_sum_unsqueeze_view", "o projection + residual", "weights"),
    ("index_copy_mul_neg", "RoPE on k + cache write", "small"),
    ("cat_mul_neg", "RoPE on q", "small"),
    ("index_copy_split", "cache write (v)", "small"),
    ("softmax", "softmax", "attention"),
    ("nvjet", "q·K or p·V (cuBLAS)", "attention"),
    ("mean_pow", "norm statistics", "small"),
    ("ArgMax", "argmax", "step"),
]
KINDS = {
    "weights": ("C0", "reads a weight matrix"),
    "attention": ("C3", "attention over the cache"),
    "small": ("C2", "small: norms, RoPE, cache writes"),
    "step": ("C7", "once a step: inputs, argmax, bookkeeping"),
}


def load(path: Path) -> tuple[dict, pd.DataFrame]:
    """The run's header and one row per (size, context)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], pd.DataFrame(lines[1:])


def role(name: str) -> tuple[str, str]:
    """(role, kind) of a kernel name; kernels no pattern names are the step's bookkeeping."""
    for pattern, what, kind in ROLES:
        if pattern in name:
            return what, kind
    return "bookkeeping", "step"


def kernels(row: pd.Series, column: str = "kernels") -> pd.DataFrame:
    """The kernels of one replay (`column` of a run's row) with their role, kind and end time."""
    frame = pd.DataFrame(row[column])
    roles, seen = [], {"norm + projection": 0, "q·K or p·V (cuBLAS)": 0}
    alternating = {
        "norm + projection": ("norm + q/k/v projection", "norm + gate/up projection"),
        "q·K or p·V (cuBLAS)": ("q·K (cuBLAS)", "p·V (cuBLAS)"),
    }
    for name in frame.name:
        what, kind = role(name)
        if what in alternating:
            seen[what] += 1
            what = alternating[what][(seen[what] - 1) % 2]
        roles.append((what, kind))
    frame[["role", "kind"]] = roles
    frame["end_us"] = frame.start_us + frame.dur_us
    return frame


def replay_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (size, context) of runs made with both attentions (`kernels` and `split_kernels`): each
    build's step as one replay's span in ms, the roofline, and the microseconds of attention in each."""
    rows = []
    for _, run in runs.iterrows():
        matmul, split = kernels(run), kernels(run, "split_kernels")
        merges = split.query("role == 'split attention: merge kernel'").dur_us
        rows.append(
            {
                "size": run["size"],
                "context": run.context,
                "matrix products": matmul.end_us.max() / 1e3,
                "split": split.end_us.max() / 1e3,
                "roofline": run.roofline_ms,
                "attention µs, matrix products": matmul.query("kind == 'attention'").dur_us.sum(),
                "attention µs, split + merge": split.query("kind == 'attention'").dur_us.sum(),
                "merge µs per layer": merges.mean(),
            }
        )
    return pd.DataFrame(rows)


def timeline(frame: pd.DataFrame, title: str, until_us: float) -> None:
    """The whole replay as a strip of kernels coloured by kind, and a close-up of its first `until_us`."""
    fig, (whole, close) = plt.subplots(
        2, 1, figsize=(10, 4.2), gridspec_kw={"height_ratios": [1, 2.2]}
    )
    for ax, part in ((whole, frame), (close, frame[frame.start_us < until_us])):
        for kind, (color, _) in KINDS.items():
            rows = part[part.kind == kind]
            ax.broken_barh(list(zip(rows.start_us, rows.dur_us)), (0, 1), color=color)
        ax.set_yticks([])
    whole.set(title=title, xlim=(0, frame.end_us.max()))
    whole.axvspan(0, until_us, color="black", alpha=0.12)
    close.set(xlim=(0, until_us), xlabel="µs since the step's first kernel")
    first = frame[frame.start_us < until_us]
    for _, k in first[first.dur_us > 2.4].iterrows():
        close.text(
            k.start_us + k.dur_us / 2, 1.08, k.role, rotation=35, fontsize=9, ha="left", va="bottom"
        )
    close.set_ylim(0, 3.2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c, _ in KINDS.values()]
    whole.legend(
        handles,
        [label for _, label in KINDS.values()],
        fontsize=9,
        ncol=2,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        frameon=False,
    )
    fig.tight_layout()
    show_figure(fig)


def bandwidth(points: pd.DataFrame, copy_bytes_per_s: float) -> None:
    """Achieved GB/s of each weight-reading kernel against the bytes it reads, one colour per model."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for (size, what), group in points.groupby(["size", "role"], sort=False):
        marker = "o" if size == "0.5B" else "s"
        ax.scatter(group.mb, group.gb_per_s, marker=marker, s=36, label=f"{size}: {what}")
    ax.axhline(copy_bytes_per_s / 1e9, color="black", ls="--", lw=1)
    ax.text(1.05, copy_bytes_per_s / 1e9 * 1.03, "copy bandwidth", fontsize=9)
    ax.set(
        xscale="log",
        xlabel="MB the kernel reads",
        ylabel="GB/s achieved",
        title="Weight-reading kernels of one decode step (H200, bf16)",
        ylim=(0, None),
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    show_figure(fig)


def budget(parts: pd.DataFrame, title: str) -> None:
    """One stacked bar per model and context: where a step's microseconds go."""
    colors = ["C0", "C9", "C3", "C2", "C7", "0.8"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    (parts / 1e3).plot.barh(stacked=True, ax=ax, color=colors, width=0.7)
    ax.set(xlabel="ms per decode step", ylabel="", title=title)
    ax.margins(x=0.05)
    ax.invert_yaxis()
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    show_figure(fig)


def by_context(steps: pd.DataFrame, columns=("eager", "graphs", "roofline")) -> None:
    """Step time against context, one panel per model, one line per column (the roofline dashed)."""
    sizes = steps["size"].unique()
    # At most 10 inches across: wider, the page shrinks the figure and its text with it.
    width = min(5 * len(sizes), 10)
    fig, axes = plt.subplots(1, len(sizes), figsize=(width, 3.4), squeeze=False)
    styles = {
        "eager": "C2o-",
        "graphs": "C3o-",
        "matrix products": "C3o-",
        "split": "C0o-",
        "roofline": "k--",
    }
    for ax, (size, rows) in zip(axes[0], steps.groupby("size", sort=False)):
        for column in columns:
            ax.plot(rows.context, rows[column], styles[column], label=column, ms=4)
        ax.set(
            xscale="log",
            xlabel="context (tokens)",
            ylabel="ms per step",
            ylim=(0, None),
            title=f"{size}, batch 1, bf16",
        )
        if len(sizes) > 2:
            ax.tick_params(axis="x", labelrotation=30)
        ax.set_xticks(rows.context, [f"{c:,}" for c in rows.context])
        ax.minorticks_off()
    axes[0][0].legend(fontsize=9)
    fig.tight_layout()
    show_figure(fig)
