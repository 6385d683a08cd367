"""Figures of the static-shapes-and-graphs page (ch5/02), the hand-written kernels page (ch5/05) and the
scorecard (ch5/06): the waterfall of decode speed, one measured bar per step from the eager loop to the fast
engine."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd

# The waterfall's steps in order, as scripts/gpu_waterfall.py names them; ch5/02 stops before the last.
STEPS = [
    "hf-eager",
    "minqwen-eager",
    "static-cache",
    "compiled",
    "graphs",
    "reductions",
    "split-attention",
    "fused-kernels",
]


def waterfall(
    tok_s: pd.DataFrame,
    rooflines: pd.Series,
    variants: list[str],
    title: str,
    reference: str = "hf-static-compile",
) -> None:
    """Decode tok/s of each variant (rows of `tok_s`, one column per model), top to bottom, on a log axis, with a
    column of labels right of the bars: each rate and its gain over the bar above. The model's roofline is a solid
    line, `reference` (another implementation, not a step) a dashed one."""
    models = list(tok_s.columns)
    fig, axes = plt.subplots(
        1, len(models), figsize=(10.2, 0.42 * len(variants) + 1.3), sharey=True
    )
    for ax, model in zip(axes, models):
        rates, roofline = tok_s.loc[variants, model], rooflines[model]
        ax.barh(range(len(variants)), rates, color=["0.7"] * 2 + ["C3"] * (len(variants) - 2))
        rate_x, gain_x = roofline * 2.4, roofline * 4.6
        for row, rate in enumerate(rates):
            gain = "" if row == 0 else f"×{rate / rates.iloc[row - 1]:.2f}"
            ax.text(rate_x, row, f"{rate:,.0f}", va="center", ha="right", fontsize=8.5)
            ax.text(gain_x, row, gain, va="center", ha="right", fontsize=8.5)
        for x, header in ((rate_x, "tok/s"), (gain_x, "gain")):
            ax.text(x, -0.85, header, ha="right", fontsize=8.5, color="0.35")
        ax.axvline(roofline, color="black", lw=1.2)
        ax.text(roofline / 1.05, len(variants) - 0.35, "roofline", ha="right", fontsize=8.5)
        if reference in tok_s.index:
            ax.axvline(tok_s.loc[reference, model], color="C1", ls="--", lw=1.2)
            ax.text(
                tok_s.loc[reference, model] / 1.05,
                -0.85,
                reference,
                ha="right",
                color="C1",
                fontsize=8.5,
            )
        low, high = rates.min() / 1.6, roofline * 5.2
        ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if low <= t <= roofline]
        if len(ticks) > 4:
            ticks = [t for t in (10, 30, 100, 300, 1000, 3000) if low <= t <= roofline]
        ax.set(xscale="log", xlim=(low, high), ylim=(len(variants) - 0.4, -1.3), title=model)
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.set_xlabel("decode tok/s")
        ax.minorticks_off()
    axes[0].set_yticks(range(len(variants)), variants)
    fig.suptitle(title)
    fig.tight_layout()
    show_figure(fig)


SWEEP_STYLES = {
    "hf-eager": "C0o-",
    "hf-static-compile": "C1o-",
    "minqwen-fast": "C3o-",
    "roofline": "k--",
}


def by_batch(sweep: pd.DataFrame, title: str) -> None:
    """Decode tok/s against batch size for each implementation of a `minqwen bench` sweep, one panel per model,
    both axes logarithmic; cells a run skipped are simply absent."""
    models = list(dict.fromkeys(sweep.model))
    fig, axes = plt.subplots(1, len(models), figsize=(10.2, 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sweep[sweep.model == model]
        for impl, style in SWEEP_STYLES.items():
            line = mine[mine.impl == impl].groupby("batch_size").decode_tok_s.mean()
            if len(line):
                ax.plot(line.index, line.values, style, ms=4, label=impl)
        batches = sorted(mine.batch_size.unique())
        ax.set(xscale="log", yscale="log", xlabel="batch size", title=model)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
    axes[0][0].set_ylabel("decode tok/s")
    axes[0][0].legend(fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    show_figure(fig)
