"""Figures and tables of the environment page (ch0/00)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd

from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, parameter_count
from minqwen.tools.hardware import HEADROOM, memory_estimate

GIB = 2**30
PARTS = {"weights": "#9ecae1", "kv_cache": "#fdae6b", "activations": "#a1d99b"}


def report_table(report) -> pd.DataFrame:
    """The hardware report as one row per field, sizes in GiB."""
    rows = {
        field: (f"{value / GIB:.1f} GiB" if field.endswith("_bytes") and value else value)
        for field, value in report.to_dict().items()
    }
    return pd.DataFrame({"value": rows}).rename_axis("field")


def sizes_table(context: int = 4096) -> pd.DataFrame:
    """One row per Qwen2.5 size: parameters, KV bytes per token and the estimate's parts at `context`."""
    rows = []
    for size in SIZES:
        est = memory_estimate(size, "bfloat16", context=context)
        rows.append(
            {
                "size": size,
                "parameters (B)": round(parameter_count(size) / 1e9, 3),
                "KV bytes/token": kv_cache_bytes_per_token(size, "bfloat16"),
                "weights GiB": round(est["weights"] / GIB, 2),
                f"KV @{context // 1024}k GiB": round(est["kv_cache"] / GIB, 2),
                "activations GiB": round(est["activations"] / GIB, 2),
                "total bf16 GiB": round(est["total"] / GIB, 2),
                "total fp32 GiB": round(
                    memory_estimate(size, "float32", context=context)["total"] / GIB, 2
                ),
            }
        )
    return pd.DataFrame(rows).set_index("size")


def memory_against_context(sizes: tuple[str, ...], budgets: dict[str, float]) -> None:
    """Left: each size's bf16 total against context length, with memory budgets as lines. Right: what the total
    is made of at 4k and at 128k tokens."""
    contexts = [2**k for k in range(10, 18)]
    fig, (ax, parts) = plt.subplots(
        1, 2, figsize=(10.4, 4.8), gridspec_kw={"width_ratios": [1.4, 1], "wspace": 0.4}
    )
    for size in sizes:
        totals = [memory_estimate(size, "bfloat16", c)["total"] / GIB for c in contexts]
        (line,) = ax.plot(contexts, totals, marker="o", ms=4)
        ax.text(
            contexts[-1] * 1.12, totals[-1], size, va="center", fontsize=10, color=line.get_color()
        )
    for name, gib in budgets.items():
        ax.axhline(HEADROOM * gib, color="gray", ls="--", lw=0.8)
        ax.text(contexts[0], HEADROOM * gib * 1.06, f"90% of {name}", fontsize=9, color="0.35")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts, [f"{c // 1024}k" for c in contexts])
    ax.set_xlim(contexts[0] / 1.3, contexts[-1] * 1.7)
    ax.set(xlabel="context length (tokens)", ylabel="GiB needed (bf16, batch 1)")
    ax.set_title("Total memory against context length", fontsize=11, loc="left", pad=26)

    labels = []
    for i, context in enumerate((4096, 131072)):
        for j, size in enumerate(sizes):
            est = memory_estimate(size, "bfloat16", context)
            y = i * (len(sizes) + 1) + j
            left = 0.0
            for part, color in PARTS.items():
                share = est[part] / est["total"]
                parts.barh(
                    y,
                    share,
                    left=left,
                    color=color,
                    edgecolor="white",
                    lw=0.5,
                    label=part.replace("_", " ").replace("kv", "KV") if y == 0 else None,
                )
                left += share
            labels.append((y, f"{size} at {context // 1024}k"))
    parts.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=9)
    parts.invert_yaxis()
    parts.set_xlabel("share of the total")
    parts.set_xlim(0, 1)
    parts.set_title("What the total is made of", fontsize=11, loc="left", pad=26)
    parts.legend(
        fontsize=9,
        loc="lower left",
        bbox_to_anchor=(0, 1.0),
        ncol=3,
        frameon=False,
        borderaxespad=0.2,
        handlelength=1.2,
        columnspacing=1.0,
    )
    show_figure(fig)
