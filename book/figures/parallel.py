"""Figures and tables of chapter 8 (tensor parallelism): who holds which slice, one layer's data flow, the
collectives' costs, the two-GPU measurements and the projection past two GPUs."""

from __future__ import annotations

from helpers import show_figure, table

import json
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

from minqwen.model.sizes import kv_cache_bytes_per_token

RANK_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7")
# The matrices of one layer, (rows, columns) in units of the hidden size, and the dimension split.
LAYER_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def split_map(shapes: dict[str, tuple[int, int]], split_dim: dict[str, int], world: int) -> None:
    """Each matrix of one layer, and the embedding, striped by the rank that holds each slice. Heights and
    widths are to scale up to three times the hidden size; taller matrices are cut, their shape written."""
    hidden = shapes["o_proj"][0]
    names = [*LAYER_MATRICES, "embed_tokens"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    x = 0.0
    for name in names:
        rows, columns = shapes[name]
        height, width = min(rows / hidden, 3.0), min(columns / hidden, 3.0)
        dim = split_dim.get(name)
        for rank in range(world):
            if dim == 0:
                piece = Rectangle((x, 3 - height * (rank + 1) / world), width, height / world)
            else:
                piece = Rectangle((x + width * rank / world, 3 - height), width / world, height)
            piece.set(facecolor=RANK_COLORS[rank], alpha=0.75, edgecolor="white")
            ax.add_patch(piece)
        ax.text(x + width / 2, 3.1, name, ha="center", fontsize=8)
        ax.text(
            x + width / 2,
            2.95 - height,
            f"{rows:,} x {columns:,}",
            ha="center",
            va="top",
            fontsize=7,
        )
        x += width + 0.35
    for rank in range(world):
        ax.add_patch(Rectangle((0, 0), 0, 0, color=RANK_COLORS[rank], label=f"rank {rank}"))
    ax.set(xlim=(-0.2, x), ylim=(-0.4, 3.4), aspect="equal")
    ax.axis("off")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, ncol=world, frameon=False)
    ax.set_title(
        f"One layer and the embedding over {world} ranks: rows split (q, k, v, gate, up, embedding) "
        "or columns split (o, down)",
        fontsize=9,
    )
    show_figure(fig)


def layer_flow(world: int = 2) -> None:
    """One decoder layer on `world` ranks: each computes its heads and its MLP channels on the whole input, and
    the two all-reduces sum the partial outputs of o_proj and down_proj."""
    fig, ax = plt.subplots(figsize=(11, 1.2 + 1.1 * world))
    steps = [
        "RMSNorm",
        "q, k, v\n(own heads)",
        "RoPE, cache,\nattention",
        "o_proj\n(partial)",
        None,
        "RMSNorm",
        "gate, up\n(own channels)",
        "SwiGLU",
        "down_proj\n(partial)",
        None,
    ]
    width, gap = 0.9, 0.25
    for rank in range(world):
        y = (world - 1 - rank) * 1.1
        ax.text(
            -0.35,
            y + 0.3,
            f"rank {rank}",
            ha="right",
            va="center",
            fontsize=9,
            color=RANK_COLORS[rank],
        )
        for i, step in enumerate(steps):
            x = i * (width + gap)
            if step is None:
                continue
            ax.add_patch(
                FancyBboxPatch(
                    (x, y),
                    width,
                    0.6,
                    boxstyle="round,pad=0.02",
                    facecolor=RANK_COLORS[rank],
                    alpha=0.25,
                    edgecolor=RANK_COLORS[rank],
                )
            )
            ax.text(x + width / 2, y + 0.3, step, ha="center", va="center", fontsize=7)
            if i + 1 < len(steps):
                ax.annotate(
                    "",
                    (x + width + gap, y + 0.3),
                    (x + width, y + 0.3),
                    arrowprops=dict(arrowstyle="->", lw=0.8),
                )
    for i in (4, 9):
        x = i * (width + gap)
        ax.add_patch(
            Rectangle((x, -0.05), width, (world - 1) * 1.1 + 0.7, facecolor="0.85", edgecolor="0.3")
        )
        ax.text(
            x + width / 2,
            ((world - 1) * 1.1 + 0.6) / 2,
            "all-reduce\n(sum)\n+ residual",
            ha="center",
            va="center",
            fontsize=7,
        )
    ax.set(xlim=(-1.2, len(steps) * (width + gap)), ylim=(-0.2, (world - 1) * 1.1 + 0.8))
    ax.axis("off")
    ax.set_title(
        "One decoder layer under tensor parallelism: two all-reduces, everything else rank-local",
        fontsize=9,
    )
    show_figure(fig)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stamp(records: list[dict]) -> str:
    r = records[0]
    return (
        f"{r['gpus']} x {r['device']}, NVLink, torch {r['torch']}, NCCL {r['nccl']}, "
        f"transformers {r['transformers']}, {r['date']}"
    )


def check_table(records: list[dict]):
    """The greedy agreement of the tensor-parallel 0.5B with one GPU, per dtype and batch."""
    return table(
        [
            {
                "dtype": r["dtype"],
                "batch": r["batch_size"],
                "new tokens": r["new_tokens"],
                "fast engine, TP=2: tokens equal to one GPU": ", ".join(
                    map(str, r["fast_tp_vs_one_gpu"])
                ),
                "eager model, TP=2": ", ".join(map(str, r["eager_tp_vs_one_gpu"])),
            }
            for r in records
            if r["kind"] == "check"
        ]
    )


COLLECTIVES = {
    "nccl_python_us": "NCCL, called from Python",
    "nccl_graph_us": "NCCL, replayed in a CUDA graph",
    "symm_mem_one_shot_us": "symmetric memory one-shot, from Python",
}


def collectives_figure(records: list[dict]) -> None:
    rows = [r for r in records if r["kind"] == "collective"]
    labels = [f"{r['size']}\n{r['hidden']:,} x {r['batch_size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 3.4))
    width = 0.27
    for i, (key, label) in enumerate(COLLECTIVES.items()):
        ax.bar(
            [j + (i - 1) * width for j in range(len(rows))],
            [r[key] for r in rows],
            width,
            label=label,
        )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(
        ylabel="µs per all-reduce",
        xlabel="model, hidden size x batch (bf16)",
        title="One all-reduce of a layer's output on two H200s",
    )
    ax.set_ylim(0, max(r["nccl_python_us"] for r in rows) * 1.4)
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    show_figure(fig)


def decode_rows(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "decode"]


def speed(records: list[dict], model: str, impl: str, tp: int, batch: int) -> float | None:
    found = [
        r["decode_tok_s"]
        for r in decode_rows(records)
        if (r["model"], r["impl"], r["tp"], r["batch_size"]) == (model, impl, tp, batch)
    ]
    return found[0] if found else None


def bytes_per_step(records: list[dict], model: str, batch: int) -> float:
    """What one decode step reads: every weight, and each row's cached keys and values at the run's mean
    context (the prompt and half the new tokens)."""
    run = next(r for r in decode_rows(records) if r["model"] == model and "weight_bytes" in r)
    context = run["prompt_len"] + run["new_tokens"] / 2
    return run["weight_bytes"] + batch * context * kv_cache_bytes_per_token(model)


def speed_table(records: list[dict], bandwidth: float):
    """Decode tok/s of each model and batch: one GPU, two GPUs (minqwen's tensor parallelism, and HF's
    layers spread over both), the speedup, and the two-GPU run against its bandwidth roofline."""
    cells = sorted(
        {(r["model"], r["batch_size"]) for r in decode_rows(records)},
        key=lambda c: (float(c[0][:-1]), c[1]),
    )
    rows = []
    for model, batch in cells:
        one = speed(records, model, "minqwen-fast", 1, batch)
        two = speed(records, model, "minqwen-fast", 2, batch)
        hf = speed(records, model, "hf-device-map-auto", 2, batch)
        roofline = batch * 2 * bandwidth / bytes_per_step(records, model, batch)
        rows.append(
            {
                "model": model,
                "batch": batch,
                "1 GPU (tok/s)": None if one is None else round(one, 1),
                "TP=2 (tok/s)": None if two is None else round(two, 1),
                "TP=2 / 1 GPU": None if one is None or two is None else f"{two / one:.2f}x",
                "TP=2 / roofline": None if two is None else f"{two / roofline:.0%}",
                "HF device_map, 2 GPUs": None if hf is None else round(hf, 1),
                "TP=2 / HF": None if hf is None or two is None else f"{two / hf:.1f}x",
            }
        )
    return table(rows).fillna("-")


def speedup_figure(records: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for model, marker in (("7B", "o"), ("32B", "s")):
        batches = sorted(
            {r["batch_size"] for r in decode_rows(records) if r["model"] == model and r["tp"] == 1}
        )
        ratios = [
            speed(records, model, "minqwen-fast", 2, b)
            / speed(records, model, "minqwen-fast", 1, b)
            for b in batches
        ]
        ax.plot(batches, ratios, marker=marker, label=f"{model}: TP=2 over one GPU")
    ax.axhline(2, color="0.6", ls=":", lw=1)
    ax.axhline(1, color="0.6", lw=1)
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="decode speedup",
        ylim=(0, 2.2),
        title="Tensor parallelism on two H200s, minqwen's fast engine, bf16",
    )
    ax.set_xticks([1, 8, 64], ["1", "8", "64"])
    ax.legend(fontsize=8)
    show_figure(fig)


def step_ms(tok_s: float, batch: int) -> float:
    return batch / tok_s * 1e3


def step_budget(records: list[dict], model: str, bandwidth: float, batch: int = 1) -> dict:
    """Where a decode step's time goes, from three measured runs: one GPU, TP=2, and TP=2 without its
    all-reduces. Reading the weights is weight bytes over the bandwidth (per GPU under TP); what is left is the
    step's fixed cost, launches and tails, which splitting does not shrink."""
    weights = bytes_per_step(records, model, batch)
    budget = {"model": model, "batch": batch}
    one = speed(records, model, "minqwen-fast", 1, batch)
    two = step_ms(speed(records, model, "minqwen-fast", 2, batch), batch)
    silent = step_ms(speed(records, model, "minqwen-fast-no-reduce", 2, batch), batch)
    if one is not None:
        budget["1 GPU: step (ms)"] = step_ms(one, batch)
        budget["1 GPU: reading weights"] = weights / bandwidth * 1e3
        budget["1 GPU: the rest"] = budget["1 GPU: step (ms)"] - budget["1 GPU: reading weights"]
    budget["TP=2: step (ms)"] = two
    budget["TP=2: reading weights"] = weights / 2 / bandwidth * 1e3
    budget["TP=2: all-reduces"] = two - silent
    budget["TP=2: the rest"] = silent - budget["TP=2: reading weights"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in budget.items()}


def project(
    weights: float,
    fixed_ms: float,
    reduce_us: float,
    reduces: int,
    bandwidth: float,
    gpus: tuple[int, ...],
    latency_growth: str,
    fixed_one_ms: float | None = None,
) -> list[dict]:
    """A projected batch-1 step on N GPUs: `weights` bytes / (N x bandwidth) + the fixed cost + `reduces`
    all-reduces. The fixed cost is `fixed_one_ms` on one GPU where it was measured, `fixed_ms` when split. An
    all-reduce's latency stays as measured on two GPUs ("flat", a one-shot kernel over NVSwitch) or grows with
    the N - 1 steps of a ring ("ring"). A projection, not a measurement."""
    rows = []
    for n in gpus:
        latency = reduce_us if latency_growth == "flat" else reduce_us * (n - 1)
        reading = weights / n / bandwidth * 1e3
        fixed = fixed_one_ms if n == 1 and fixed_one_ms is not None else fixed_ms
        communication = 0.0 if n == 1 else reduces * latency / 1e3
        rows.append(
            {
                "GPUs": n,
                "reading weights (ms)": reading,
                "fixed (ms)": fixed,
                "all-reduces (ms)": communication,
                "step (ms)": reading + fixed + communication,
            }
        )
    base = rows[0]["step (ms)"]
    for row in rows:
        row["speedup"] = base / row["step (ms)"]
    return rows


def projection_figure(curves: dict[str, list[dict]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for label, rows in curves.items():
        ax.plot([r["GPUs"] for r in rows], [r["speedup"] for r in rows], marker="o", label=label)
    gpus = [r["GPUs"] for r in next(iter(curves.values()))]
    ax.plot(gpus, gpus, color="0.6", ls=":", lw=1, label="linear")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="GPUs (tensor-parallel size)",
        ylabel="speedup over one GPU",
        title="Projected batch-1 decode speedup (from the two-GPU measurements)",
    )
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_yticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    show_figure(fig)
