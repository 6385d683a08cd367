"""Figures and tables of chapter 7 (speculative decoding): the rule's counts, acceptance by draft length, the
costs of a verifying pass, and the cost model against measured speed."""

from __future__ import annotations

from helpers import show_figure, table

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def stats_table(runs: dict):
    """One row per drafter: rounds, drafts, acceptance, tokens per target pass."""
    return table(
        [
            {
                "drafter": name,
                "target passes": s.rounds + 1,
                "new tokens": s.new_tokens,
                "drafted": s.drafted,
                "accepted": s.accepted,
                "acceptance": f"{s.acceptance_rate:.0%}",
                "tokens per pass": round(s.tokens_per_pass, 2),
            }
            for name, s in runs.items()
        ]
    )


def rule_counts(p, q, right, broken, shown: int = 12) -> None:
    """Emitted-token shares of the right rule and the broken one beside p and q, for p's likeliest tokens."""
    order = p.argsort(descending=True)[:shown]
    x = np.arange(shown)
    fig, ax = plt.subplots(figsize=(9, 3.4))
    width = 0.2
    for i, (label, values, color) in enumerate(
        [
            ("target p", p, "black"),
            ("draft q", q, "0.7"),
            ("the rule", right / right.sum(), "C0"),
            ("redraw from p (broken)", broken / broken.sum(), "C3"),
        ]
    ):
        ax.bar(x + (i - 1.5) * width, values[order].numpy(), width, label=label, color=color)
    ax.set(
        xticks=x,
        xticklabels=[str(int(t)) for t in order],
        xlabel="token id (the target's likeliest first)",
        ylabel="probability / share of 20,000",
        title="Emitted tokens: the rule follows p, the broken rule leans to q",
    )
    ax.legend(fontsize=8)
    show_figure(fig)


def load(path: Path) -> tuple[dict, list[dict], dict]:
    """The run header, the prompt records and the costs of one speculative_bench.py file."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    header = next(r for r in records if r["record"] == "run")
    prompts = [r for r in records if r["record"] == "prompt"]
    costs = next(r for r in records if r["record"] == "costs")
    return header, prompts, costs


def acceptance_by_length(prompts: list[dict]) -> None:
    """Tokens per target pass against the draft length, one line per prompt, one panel per drafter."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    colors = {"edit": "C2", "code": "C0", "chat": "C1"}
    for ax, drafter in zip(axes, ("draft-0.5B", "prompt-lookup")):
        for record in prompts:
            rows = record["acceptance"][drafter]
            k = np.arange(1, len(rows) + 1)
            per_pass = [r["new_tokens"] / (r["rounds"] + 1) for r in rows]
            ax.plot(
                k,
                per_pass,
                marker="o",
                ms=3,
                color=colors[record["category"]],
                label=record["name"],
            )
        ax.set(xlabel="draft length k", title=drafter)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tokens per target pass")
    axes[1].legend(fontsize=7, loc="upper left")
    show_figure(fig)


def stamp(machine: str, record: dict) -> str:
    return f"{machine}: {record['device']}, torch {record['torch']}, {record['dtype']}, {record['date']}"


def load_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _per_step(costs: dict, step: float) -> np.ndarray:
    return np.array([costs[str(n)] for n in range(1, 10)]) / step


def cpu_series(cpu_costs: dict) -> dict:
    """This CPU's verifying pass over n = 1..9 tokens and the 0.5B's step, in units of the 1.5B's step."""
    step = cpu_costs["verify_s"]["1"]
    return {
        "label": "CPU, 1.5B target (eager, float32)",
        "verify": _per_step(cpu_costs["verify_s"], step),
        "draft": cpu_costs["draft_step_s"] / step,
    }


def h200_series(gpu_costs: dict, target: str) -> dict:
    """The same on the H200's fast engine: `target`'s span over n tokens and the 0.5B's span of one."""
    step = gpu_costs[target]["fast_step_ms"]
    return {
        "label": f"H200, {target} target (fast engine, bf16)",
        "verify": _per_step(gpu_costs[target]["fast_verify_ms"], step),
        "draft": gpu_costs["0.5B"]["fast_verify_ms"]["1"] / step,
    }


def round_costs(series: list[dict]) -> None:
    """A verifying pass over n tokens per machine (solid) and a 0.5B draft step (dashed), in target steps."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    n = np.arange(1, 10)
    for i, s in enumerate(series):
        ax.plot(n, s["verify"], marker="o", ms=3, color=f"C{i}", label=s["label"])
        ax.axhline(s["draft"], color=f"C{i}", ls="--", lw=1)
    ax.axhline(1, color="black", lw=0.8)
    ax.set(
        xlabel="tokens in the target's pass (k + 1)",
        ylabel="cost in target decode steps",
        title="A verifying pass (solid) and one 0.5B draft step (dashed)",
        ylim=(0, None),
    )
    ax.legend(fontsize=8)
    show_figure(fig)


def _predicted(new_tokens: int, rounds: int, drafted: int, series: dict, with_draft: bool) -> float:
    """The cost model's speedup for a run, from its own rounds and drafts: the target alone takes one step per
    token after the first, which the prefill makes."""
    width = 1 + drafted / rounds
    cost = rounds * np.interp(width, np.arange(1, 10), series["verify"])
    if with_draft:
        cost += drafted * series["draft"]
    return (new_tokens - 1) / cost


def model_points(prompts, cpu_costs, gpu_runs, gpu_costs) -> list[dict]:
    """Predicted and measured speedup of every timed run on both machines."""
    cpu, h200 = cpu_series(cpu_costs), h200_series(gpu_costs, "1.5B")
    runs = [
        (
            "CPU",
            cpu,
            record["category"],
            record["new_tokens"],
            run,
            record["runs"][0]["decode_tok_s"],
        )
        for record in prompts
        for run in record["runs"][1:]
    ]
    alone = {r["name"]: r["decode_tok_s"] for r in gpu_runs if r["k"] == 0}
    runs += [
        ("H200", h200, r["category"], r["new_tokens"], r, alone[r["name"]])
        for r in gpu_runs
        if r["k"]
    ]
    return [
        {
            "machine": machine,
            "drafter": run["drafter"],
            "category": category,
            "predicted": _predicted(
                new, run["rounds"], run["drafted"], series, run["drafter"] == "draft-0.5B"
            ),
            "measured": run["decode_tok_s"] / baseline,
        }
        for machine, series, category, new, run, baseline in runs
    ]


def predicted_against_measured(points: list[dict]) -> None:
    """Measured decode speedup against the cost model's, one point per timed run, a panel per machine."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
    markers = {"draft-0.5B": "o", "prompt-lookup": "s"}
    colors = {"edit": "C2", "code": "C0", "chat": "C1"}
    top = max(max(p["predicted"], p["measured"]) for p in points) * 1.1
    for ax, machine in zip(axes, ("CPU", "H200")):
        for point in (p for p in points if p["machine"] == machine):
            ax.scatter(
                point["predicted"],
                point["measured"],
                marker=markers[point["drafter"]],
                color=colors[point["category"]],
                s=30,
            )
        ax.plot([0, top], [0, top], color="black", lw=0.8)
        ax.axhline(1, color="0.6", lw=0.8, ls=":")
        ax.set(xlabel="predicted speedup", title=machine, xlim=(0, top), ylim=(0, top))
    for name, marker in markers.items():
        axes[1].scatter([], [], marker=marker, color="0.4", label=name)
    for name, color in colors.items():
        axes[1].scatter([], [], marker="o", color=color, label=name)
    axes[0].set_ylabel("measured decode speedup")
    axes[1].legend(fontsize=8)
    show_figure(fig)


def speed_table(prompts, gpu_runs) -> pd.DataFrame:
    """Decode tok/s of the target alone and the speedup of each drafter, per prompt and machine."""
    gpu = {(r["name"], r["drafter"], r["k"]): r["decode_tok_s"] for r in gpu_runs}
    rows = []
    for record in prompts:
        cpu = {(r["drafter"], r["k"]): r["decode_tok_s"] for r in record["runs"]}
        name, cpu_alone, gpu_alone = (
            record["name"],
            cpu[("none", 0)],
            gpu[(record["name"], "none", 0)],
        )
        rows.append(
            {
                "category": record["category"],
                "prompt": name,
                "CPU alone, tok/s": round(cpu_alone, 2),
                "CPU lookup k=8": round(cpu[("prompt-lookup", 8)] / cpu_alone, 2),
                "CPU 0.5B k=4": round(cpu[("draft-0.5B", 4)] / cpu_alone, 2),
                "H200 alone, tok/s": round(gpu_alone),
                "H200 lookup k=8": round(gpu[(name, "prompt-lookup", 8)] / gpu_alone, 2),
                "H200 0.5B k=4": round(gpu[(name, "draft-0.5B", 4)] / gpu_alone, 2),
            }
        )
    return pd.DataFrame(rows)


def tokens_per_round(records: list[dict], drafter: str, k: int) -> float:
    """Mean new tokens per round (after the prefill's) of `drafter` at draft length k, from the replays."""
    replays = [r["acceptance"][drafter][k - 1] for r in records]
    return float(np.mean([(r["new_tokens"] - 1) / r["rounds"] for r in replays]))


def project(prompts, gpu_costs, target: str, k: int, host_ms=(1.0, 3.0)) -> pd.DataFrame:
    """The cost model's H200 speedup for `target`, with the acceptance measured against the 1.5B, without and
    with `host_ms` of host work per round."""
    series = h200_series(gpu_costs, target)
    step = gpu_costs[target]["fast_step_ms"]
    rows = []
    for category in ("edit", "code", "chat"):
        records = [r for r in prompts if r["category"] == category]
        for drafter, length, cost in (
            ("draft-0.5B", k, k * series["draft"] + series["verify"][k]),
            ("prompt-lookup", 8, series["verify"][8]),
        ):
            tokens = tokens_per_round(records, drafter, length)
            rows.append(
                {
                    "text": category,
                    "drafter": f"{drafter}, k={length}",
                    "tokens per round": round(tokens, 2),
                    "round cost, target steps": round(cost, 2),
                    f"projected speedup, {target}": round(tokens / cost, 2),
                    "with host work": "{:.2f} to {:.2f}".format(
                        *(tokens / (cost + ms / step) for ms in reversed(host_ms))
                    ),
                }
            )
    return pd.DataFrame(rows)


def best_draft_length(prompts, cpu_costs, category: str) -> pd.DataFrame:
    """The cost model's CPU speedup with the 0.5B draft for each k, over one kind of prompt."""
    series = cpu_series(cpu_costs)
    records = [r for r in prompts if r["category"] == category]
    rows = []
    for k in range(1, 9):
        tokens = tokens_per_round(records, "draft-0.5B", k)
        cost = k * series["draft"] + series["verify"][k]
        rows.append(
            {
                "k": k,
                "tokens per round": round(tokens, 2),
                "predicted speedup": round(tokens / cost, 2),
            }
        )
    return pd.DataFrame(rows).set_index("k")


def host_time_per_round(gpu_runs, gpu_costs) -> pd.DataFrame:
    """For the H200 runs whose rounds are full: a round's measured time minus the passes the model counts."""
    series = h200_series(gpu_costs, "1.5B")
    step = gpu_costs["1.5B"]["fast_step_ms"]
    rows = []
    for run in gpu_runs:
        if not run["k"] or (run["drafter"] == "prompt-lookup" and run["category"] != "edit"):
            continue
        measured = (run["new_tokens"] - 1) / run["decode_tok_s"] * 1e3 / run["rounds"]
        width = 1 + run["drafted"] / run["rounds"]
        passes = np.interp(width, np.arange(1, 10), series["verify"])
        if run["drafter"] == "draft-0.5B":
            passes += run["drafted"] / run["rounds"] * series["draft"]
        rows.append(
            {
                "prompt": run["name"],
                "drafter": f"{run['drafter']}, k={run['k']}",
                "round, ms": round(measured, 2),
                "passes, ms": round(passes * step, 2),
                "host ms per round": round(measured - passes * step, 2),
            }
        )
    return pd.DataFrame(rows)
