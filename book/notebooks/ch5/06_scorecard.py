# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The scorecard: what the chapter bought, and what is left
#
# This chapter was planned with targets, all on an H200 in bf16: decoding at 50% of the {term}`roofline` for the
# 0.5B, 70% for the 1.5B and 90% for the 7B at short contexts, and 80% at 8,192 and 30,000 tokens; 4 and 1.8 times
# transformers' own fast path at 0.5B and 7B; prefill at 80% of the arithmetic bound at 7B and three times
# transformers' eager prefill at 0.5B; and a lead over every transformers implementation at every batch size from 1
# to 64. (Chapter 4's targets, met on an H100, were lower.) This page puts every target beside its measurement, adds the one measurement the earlier pages lacked (batches from 1 to 64, each implementation side
# by side), and shows, for each target missed, what stands in the way, in numbers.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - where the fast engine stands against each target, and which run on which card measured it;
# - how decode speed scales with the batch for transformers' eager and compiled paths and for the fast engine,
#   against the roofline, on one H200, and what the same sweep found wrong with prefill;
# - how to turn a target into a budget: how many kernels a step may run, at the cost each kernel has today;
# - why the small models, even at six kernels a layer, need a different kind of engine (one persistent kernel
#   for the whole step), and what limits the 7B.
#
# **You need** the cost model of {doc}`02_graphs`, the profile of {doc}`01_decode_profile`, split attention
# ({doc}`03_split_attention`), prefill ({doc}`04_prefill`) and the hand-written kernels ({doc}`05_fused_kernels`). No GPU: every number is committed data (seconds).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import decode_profile
from figures import fast_engine as figures
from helpers import BOOK, show_source

import json

import numpy as np
import pandas as pd

from minqwen.engine.fast import prefill_length
from minqwen.model.sizes import (
    kv_cache_bytes_per_token,
    weight_bytes_per_step,
)

PROFILES = BOOK / "data" / "profile"
SWEEP = BOOK / "data" / "sweep"
KERNELS = BOOK / "data" / "kernels"


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


_, *lines = read_lines(KERNELS / "decode-nvidia-h200-2026-12-01.jsonl")
decode_run = pd.DataFrame(lines)
tok_s = decode_run.pivot(index="variant", columns="size", values="decode_tok_s")
roofline = decode_run.groupby("size").roofline_decode_tok_s.first()
_, *lines = read_lines(PROFILES / "waterfall-fused-nvidia-h200-2026-12-01.jsonl")
waterfall = pd.DataFrame(lines).pivot(
    index="variant", columns="size", values="decode_tok_s"
)
_, fused_runs = decode_profile.load(
    PROFILES / "decode-fused-nvidia-h200-2026-12-01.jsonl"
)
contexts = pd.DataFrame(
    {
        "size": run["size"],
        "context": run.context,
        "step": decode_profile.kernels(run, "fused_kernels").end_us.max() / 1e3,
        "roofline": run.roofline_ms,
    }
    for _, run in fused_runs.iterrows()
).set_index(["size", "context"])
prefill = {
    size: pd.DataFrame(
        read_lines(PROFILES / f"prefill-{size}-nvidia-h200-2026-11-30.jsonl")[1:]
    )
    for size in ("0.5B", "7B")
}
sweep = pd.concat(
    pd.DataFrame(read_lines(p)) for p in sorted(SWEEP.glob("nvidia-*.jsonl"))
)
lengths_run = pd.concat(
    pd.DataFrame(read_lines(p)) for p in sorted(SWEEP.glob("prefill-lengths-*.jsonl"))
)

# %% [markdown]
# ## Two measures of "fast"
#
# Decoding is measured against the roofline: the time a step must take to read its $W$ bytes of weights and
# $T K$ bytes of cache ($T$ tokens of context, summed over the batch's rows, $K$ bytes each) at the card's copy
# bandwidth $\beta$, over the time it does take,
#
# $$
# \eta_\text{decode} \;=\; \frac{(W + T K)/\beta}{t_\text{step}} ,
# $$
#
# and prefill against the arithmetic bound, its $F$ FLOPs at the matrix rate $R$ measured in the same run,
#
# $$
# \eta_\text{prefill} \;=\; \frac{F / R}{t_\text{prefill}} .
# $$
#
# Both rates are measured at the start of every run, so $\eta$ compares a run with its own card. That is also why
# a faster card can score lower: the 7B reached 87% of an H100's roofline in chapter 4, and the same fixed costs
# weigh more beside the H200's higher bandwidth. The rest are ratios of two implementations measured one after the
# other in one process.
#
# ## The targets
#
# Every row below is computed from the committed files: the side-by-side run of {doc}`05_fused_kernels`
# ("kernels run": prompt 128, transformers' compiled path in the same process), the waterfall run of the same page
# (another H200), the profile run (contexts 256, 8,192 and 30,000; step time as one graph replay's span), the
# prefill runs of {doc}`04_prefill`, and the batch sweep further down. All on H200s, bf16, random weights with the
# real configs.

# %% tags=["hide-input"]
of_roofline = tok_s.loc["fused-kernels"] / roofline
over_hf = tok_s.loc["fused-kernels"] / tok_s.loc["hf-static-compile"]
over_hf_waterfall = waterfall.loc["fused-kernels"] / waterfall.loc["hf-static-compile"]
at_context = contexts.roofline / contexts.step
prefill_7b = prefill["7B"].query("kind == 'prefill'").set_index("variant")
prefill_05 = prefill["0.5B"].query("kind == 'prefill'").set_index("variant")
decode = sweep[sweep.impl != "roofline"].pivot_table(
    index=["model", "batch_size"], columns="impl", values="decode_tok_s"
)
hf_columns = [c for c in decode.columns if c.startswith("hf")]
lead = decode["minqwen-fast"] / decode[hf_columns].max(axis=1)
rows = [
    ("decode, prompt 128, 0.5B", "≥ 50% of roofline", of_roofline["0.5B"], 0.50),
    ("decode, prompt 128, 1.5B", "≥ 70% of roofline", of_roofline["1.5B"], 0.70),
    ("decode, prompt 128, 7B", "≥ 90% of roofline", of_roofline["7B"], 0.90),
    ("0.5B over hf-static-compile, kernels run", "≥ 4×", over_hf["0.5B"], 4.0),
    (
        "0.5B over hf-static-compile, waterfall run",
        "≥ 4×",
        over_hf_waterfall["0.5B"],
        4.0,
    ),
    ("7B over hf-static-compile, kernels run", "≥ 1.8×", over_hf["7B"], 1.8),
    (
        "7B over hf-static-compile, waterfall run",
        "≥ 1.8×",
        over_hf_waterfall["7B"],
        1.8,
    ),
    ("decode at 8,192 tokens, 7B", "≥ 80% of roofline", at_context["7B", 8192], 0.80),
    ("decode at 30,000 tokens, 7B", "≥ 80% of roofline", at_context["7B", 30000], 0.80),
    (
        "decode at 8,192 tokens, 0.5B",
        "≥ 80% of roofline",
        at_context["0.5B", 8192],
        0.80,
    ),
    (
        "decode at 30,000 tokens, 0.5B",
        "≥ 80% of roofline",
        at_context["0.5B", 30000],
        0.80,
    ),
    (
        "prefill 2,048 tokens, 7B",
        "≥ 80% of FLOP bound",
        prefill_7b.tok_s["graph"] / prefill_7b.flop_bound_tok_s["graph"],
        0.80,
    ),
    (
        "prefill 2,048 tokens, 0.5B, over HF eager",
        "≥ 3×",
        prefill_05.tok_s["graph"] / prefill_05.tok_s["hf-eager"],
        3.0,
    ),
    ("fast over the best HF, every batch 1-64", "> 1×", lead.min(), 1.0),
]
scorecard = pd.DataFrame(rows, columns=["target", "aim", "measured", "threshold"])
scorecard["met"] = scorecard.measured >= scorecard.threshold
scorecard["measured"] = [
    f"{m:.0%}" if "%" in aim else f"{m:.2f}×"
    for m, aim in zip(scorecard.measured, scorecard.aim)
]
scorecard.drop(columns="threshold").set_index("target")

# %% [markdown]
# Fourteen rows for twelve targets, since each ratio over transformers' compiled path was measured in two runs.
# Four of the targets are met, and a fifth in one of its two runs: the 7B at 8,192 and 30,000 tokens, the
# 0.5B's prefill over transformers and the lead at every batch; the 0.5B's ratio over transformers' compiled path
# was 4.57× in one run and 3.87× in the other (transformers measured 319 and 380 tok/s on the two machines, the
# six kernels 1,461 and 1,469). The pattern is plain: what depends on reading bytes well is met or close (the 7B
# at every context, its prefill at 79% of an 80% aim), and what depends on a step's fixed cost is far off (the
# 0.5B at every context, the 1.5B). The 7B's ratio over transformers is capped by the roofline itself:
# transformers' compiled path reached 48% and 49% of it in the two runs, so 1.8× needs 86% or more; the six
# kernels reached 84% and 86%, and 1.75× and 1.74×.

# %%
print(scorecard.met.value_counts().to_string())
assert scorecard.set_index("target").met["decode at 30,000 tokens, 7B"]
assert not scorecard.set_index("target").met["decode, prompt 128, 0.5B"]

# %% [markdown]
# ## Batch 1 to 64
#
# The earlier pages measured batch 1. A server batches, and the roofline grows almost with the batch until the
# cache's bytes catch up with the weights' ({doc}`../ch4/05_performance`). Each implementation at every batch
# from 1 to 64, prompt 128, 128 new tokens (`python -m minqwen bench`); `hf-static-compile` recompiles for every
# batch, so its cells take longest:

# %% tags=["hide-input"]
figures.by_batch(sweep, f"Decode by batch, {sweep.device.iloc[0]}, bf16, prompt 128")

# %% tags=["hide-input"]
ratios = decode.assign(
    **{"fast / best HF": lead},
    **{
        "fast / roofline": decode["minqwen-fast"]
        / sweep.query("impl == 'roofline'")
        .set_index(["model", "batch_size"])
        .decode_tok_s
    },
)
ratios.style.set_uuid("scorecard-sweep").format(
    "{:,.0f}", subset=[c for c in ratios if "/" not in c]
).format("{:.2f}", subset=[c for c in ratios if "/" in c])

# %% [markdown]
# The fast engine leads at every batch measured: 2.3 to 2.9 times transformers' compiled path at 0.5B, and at 7B
# from 1.5 times at batch 1 to 2.4 times at 64. The 7B's lead grows with the batch because the compiled path's
# step grows faster than the fast engine's (its tok/s rise 31-fold from batch 1 to 64, the fast engine's 49-fold),
# while at 0.5B both stay far below the roofline, held there by fixed costs. The sweep ran before the six kernels
# of {doc}`05_fused_kernels`, which change batch 1 only: in their own side-by-side run they were 15% to 36% faster
# than the compiled layer.

# %%
assert (lead > 1).all()

# %% [markdown]
# ### Prefill by batch: what the sweep found
#
# The same runs timed each batch's prefill, and there the fast engine lost: at 7B, from batch 8 up, it prefilled
# about 25k tok/s against transformers' 33k to 38k. The cause was padding. A prompt that fits one chunk is
# prefilled by a CUDA graph of fixed length, and the engine rounded the prompt up to the cache's 256-position
# bucket: a 128-token prompt computed 256 tokens a row. At batch 1 the 7B's prefill reads weights and the padding
# is nearly free; at batch 8 it is arithmetic, and half of it was padding. The fix pads a prompt of 128 tokens or
# more by under a quarter, with four lengths per doubling of the prompt:

# %%
show_source(prefill_length)

# %% [markdown]
# The same cells again with the fix, prefill tok/s, each beside transformers' eager path of its own run:


# %% tags=["hide-input"]
def prefill_by_batch(run: pd.DataFrame) -> pd.DataFrame:
    return run[run.impl.isin(["hf-eager", "minqwen-fast"])].pivot_table(
        index=["model", "batch_size"], columns="impl", values="prefill_tok_s"
    )


before, after = prefill_by_batch(sweep), prefill_by_batch(lengths_run)
prefill_table = pd.DataFrame(
    {
        "fast, padded to the bucket": before["minqwen-fast"],
        "HF eager, same run": before["hf-eager"],
        "fast, padded by under 1/4": after["minqwen-fast"],
        "HF eager, its run": after["hf-eager"],
    }
).dropna()
prefill_table["fast / HF, before"] = prefill_table.iloc[:, 0] / prefill_table.iloc[:, 1]
prefill_table["fast / HF, after"] = prefill_table.iloc[:, 2] / prefill_table.iloc[:, 3]
prefill_table.style.set_uuid("scorecard-prefill").format("{:,.0f}").format(
    "{:.2f}", subset=["fast / HF, before", "fast / HF, after"]
)

# %% [markdown]
# The 7B's prefill doubled from batch 8 up, as halving its work predicts, and now leads transformers' at every batch
# measured; the 0.5B's at batch 64 nearly doubled too. At batch 1 both implementations moved between the two runs
# (transformers' by 61%, on another machine): a 128-token prefill at batch 1 lasts a few milliseconds, mostly
# launches, and varies from run to run far more than the long ones. In float32 on the H200 the fast engine's greedy tokens still
# equal the eager loop's for prompts padded to every kind of length (NOTES.md), and on the CPU a test holds the
# padding under a quarter.

# %%
assert (prefill_table["fast / HF, after"] > 1).all()

# %% [markdown]
# ## What stands in the way
#
# The cost model of {doc}`02_graphs`, $t_\text{step} \approx W/\beta + n\tau$, turns a target into a budget.
# To reach a fraction $\eta$ of the roofline, a step may take $W/(\beta\eta)$, so its kernels may cost at most
#
# $$
# n\,\tau \;\le\; \frac{W}{\beta}\left(\frac{1}{\eta} - 1\right).
# $$
#
# The profile run of {doc}`05_fused_kernels` holds every kernel of one step of today's engine for each size, at a
# 256-token context. From them: the step and the time its weights need at the run's copy bandwidth, $\tau$, how
# fast the weight kernels read, how long the kernels that read no weights take, and how many kernels the target
# allows at today's $\tau$:

# %% tags=["hide-input"]
AIMS = {"0.5B": 0.5, "1.5B": 0.7, "7B": 0.9}
rows = []
for _, run in fused_runs.query("context == 256").iterrows():
    size, kernels = run["size"], decode_profile.kernels(run, "fused_kernels")
    step_ms = kernels.end_us.max() / 1e3
    read_ms = weight_bytes_per_step(size) / run.copy_bytes_per_s * 1e3
    tau_us = (step_ms - read_ms) / len(kernels) * 1e3
    weights = kernels.query("kind == 'weights'")
    rows.append(
        {
            "size": size,
            "step ms": step_ms,
            "weights at copy rate, ms": read_ms,
            "kernels": len(kernels),
            "tau µs": tau_us,
            "weight kernels' rate / copy": read_ms / (weights.dur_us.sum() / 1e3),
            "other kernels, ms": kernels.query("kind != 'weights'").dur_us.sum() / 1e3,
            "aim": AIMS[size],
            "kernels the aim allows": read_ms * (1 / AIMS[size] - 1) * 1e3 / tau_us,
        }
    )
budget = pd.DataFrame(rows).set_index("size")
budget.style.set_uuid("scorecard-budget").format("{:.2f}").format(
    "{:.0f}", subset=["kernels", "kernels the aim allows"]
).format("{:.0%}", subset=["aim", "weight kernels' rate / copy"])

# %% [markdown]
# The two small models are still bound by their fixed cost, though it has shrunk: 156 kernels for the 0.5B where
# there were 276, and 180 for the 1.5B where there were 348. Their weight kernels read at half and two-thirds of
# the copy rate (a kernel that reads a few MB is over before the memory reaches full speed), and each kernel
# costs about 3 µs beyond its bytes. At that cost the 0.5B's aim allows about half the kernels it runs, some three
# a layer where it runs six. Fewer kernels by more folding (attention's two into one, the output projection into
# the merge) would not get there; what remains is the approach of the fastest small-model engines: the whole step
# as one *persistent* kernel that stays on the GPU and works through every layer without returning to the host,
# loading the next layer's weights while it finishes the current one (Hazy Research's "megakernel" runs a 1B model
# at batch 1 at 78% of an H100's bandwidth). That is a project of its own, and the step this chapter stops short
# of.
#
# The 7B is bound differently. Its step takes 4.05 ms, its weights need 3.44 at the copy rate, and 90% of the
# roofline allows 3.83. Of the 0.61 ms beyond the weights, about 0.36 is the weight kernels reading at 90% of the
# copy rate, and 0.25 the kernels that read no weights (attention, the step's bookkeeping) and the gaps. The
# q/k/v and o projections read slowest of its weight kernels, at 67% and 71% of the copy rate, and the down
# projection loses the most time, at 87% ({doc}`05_fused_kernels`); more loads in flight for those (splitting
# long rows across programs, split-K) and folding attention's merge into the output projection are the next
# steps toward 90%.

# %%
assert (budget["kernels the aim allows"] < budget.kernels).all()
assert (
    budget.loc["7B", "weight kernels' rate / copy"]
    > budget.loc["0.5B", "weight kernels' rate / copy"]
)


# %% [markdown]
# ## Summary
#
# - Four of the chapter's twelve targets are met in every run that measured them: the 7B at 84% of the roofline
#   at 8,192 and 30,000 tokens, the 0.5B's prefill over transformers, and a decode lead over every transformers
#   implementation at every batch from 1 to 64. A fifth, the 0.5B at 4× transformers' compiled path, was met in
#   one of two runs (4.57× and 3.87×).
# - The batch sweep found the prefill padding half of its work at 7B from batch 8 up; padding by under a quarter
#   doubled its speed, now ahead of transformers at every batch measured.
# - The targets missed by far are the ones a step's fixed cost sets: the 0.5B at every context (35% at a short
#   one against an aim of 50%, 35% and 38% at 8,192 and 30,000 tokens against 80%) and the 1.5B (56% of 70%).
#   The 7B misses its short-context aim by 6 points, its ratio over transformers by 0.05 to 0.06, and its
#   prefill aim by one point.
# - A target becomes a kernel budget, $n\tau \le (W/\beta)(1/\eta - 1)$: half the 0.5B's roofline allows about
#   half the kernels it runs, at today's cost per kernel.
# - What is left for the small models is one persistent kernel per step; for the 7B, faster q/k/v, o and down
#   projections and fewer small kernels.
#
# ## Exercises
#
# ````{exercise}
# :label: scorecard-tau
# Instead of fewer kernels, a megakernel makes each cheaper: no launch, no tail, the next layer's weights
# already loading. At the 0.5B's current kernel count, what $\tau$ would reach 50% and 65% of its roofline?
# ````
#
# ```{solution-start} scorecard-tau
# :class: dropdown
# ```

# %%
run = fused_runs.query("size == '0.5B' and context == 256").iloc[0]
timeline = decode_profile.kernels(run, "fused_kernels").sort_values("start_us")
read_ms = weight_bytes_per_step("0.5B") / run.copy_bytes_per_s * 1e3
for eta in (0.5, 0.65):
    tau = read_ms * (1 / eta - 1) / len(timeline) * 1e3
    print(f"{eta:.0%} of the roofline: tau <= {tau:.2f} µs per kernel")
gaps = timeline.start_us.iloc[1:].to_numpy() - timeline.end_us.iloc[:-1].to_numpy()
small = timeline[timeline.kind != "weights"]
print(f"today: {gaps.mean():.2f} µs of gap between kernels on average, and the kernels")
print(f"that read no weights run {small.dur_us.median():.1f} µs each (median)")

# %% [markdown]
# About 1.5 µs per kernel for 50%, under one for 65%, where today's cost is about 3. The gaps between kernels are
# already under half a microsecond; what is left is each kernel's own ramp and tail, the microsecond or two it
# takes to fill the memory system with loads and drain it, and the kernels that read no weights (attention and
# its merge at a short context, the step's bookkeeping) still take about 2 µs each for almost no bytes. Separate
# kernels keep paying that ramp; a persistent kernel pays it once.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: scorecard-batch
# In the sweep, the fast engine's fraction of the roofline falls as the batch grows. Fit the 0.5B's step time to
# $t(B) = t_0 + cB$. How much of the batch-64 step is per-row cost, and how does $c$ compare with the time a
# row's own cache bytes need?
# ````
#
# ```{solution-start} scorecard-batch
# :class: dropdown
# ```

# %%
fast_05 = decode.loc["0.5B", "minqwen-fast"]
step_us = fast_05.index / fast_05 * 1e6
slope, t0 = np.polyfit(fast_05.index, step_us, 1)
beta_sweep = sweep.query(
    "model == '0.5B' and impl == 'roofline'"
).copy_bytes_per_s.iloc[0]
row_bytes = (128 + 64) * kv_cache_bytes_per_token("0.5B")
print(
    f"t(B) = {t0:.0f} µs + {slope:.1f} µs x B; at B = 64, {64 * slope / step_us[64]:.0%} is per row"
)
print(f"a row's cache bytes need {row_bytes / beta_sweep * 1e6:.2f} µs")

# %% [markdown]
# The fixed part is the batch-1 step; each row then adds several microseconds, many times what its cache bytes
# need. At batch 64 that per-row work is a large share of the step: the larger products and the attention over
# each row's bucket, which the batch-1 profile of this chapter never looked at. The next profile to take is one
# at batch 64.
#
# ```{solution-end}
# ```
