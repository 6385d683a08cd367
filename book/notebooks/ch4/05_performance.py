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
# # How fast, against what limit: the baseline and a fast path
#
# The chapters so far built a correct generator. How fast is it, and how fast *could* it be? Two kinds of number
# answer that: measured tokens per second ({term}`tok/s`) of several implementations side by side, and the
# hardware's limit for the same work, the {term}`roofline`. This page sets both down, explains the gap, and
# measures the fast path that closes most of it, which chapter 5 then builds step by step.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the two limits: a {term}`decode` step must read every weight and the cache once, a {term}`prefill` must do
#   its FLOPs or read the weights, whichever takes longer; and the code that computes both;
# - how the benchmark times prefill and decode apart, and what it measured on an H100 for four implementations,
#   by batch size and prompt length: decode and prefill tok/s, and peak memory;
# - why batch-1 decoding of a small model is far from its roofline, and how far the fast path of chapter 5 gets;
# - why decoding stays bound by memory bandwidth even at batch 64.
#
# **You need** the {term}`KV cache` and its size from {doc}`01_hf_cache`, the cached loop of
# {doc}`02_manual_cache` and batches from {doc}`03_batching`. Nothing here needs a GPU: the GPU results are
# committed data, and the page re-runs a small benchmark on the CPU (about a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import performance as figures
from helpers import BENCH, show_source, toy_checkpoint

import json
import math

import pandas as pd
import torch

from minqwen.model.sizes import (
    kv_cache_bytes_per_token,
    parameter_count,
    prefill_flops,
    qwen25_config,
    weight_bytes_per_step,
)
from minqwen.tools import bench

runs = pd.DataFrame(
    json.loads(line)
    for path in sorted(BENCH.glob("*.jsonl"))
    if not path.name.startswith("fast-agreement")
    for line in path.read_text().splitlines()
)
h100 = runs[runs.device == "NVIDIA H100 80GB HBM3"]
IMPLS = ["hf-eager", "hf-static-compile", "minqwen-eager", "minqwen-fast", "roofline"]

# %% [markdown]
# ## The data
#
# The GPU numbers on this page were measured with `python -m minqwen bench` on one NVIDIA H100 80GB HBM3, in
# bfloat16, and committed under `book/data/bench/` with the notes of every attempt (`book/data/bench/NOTES.md`).
# The GPU machine could not reach the model hub, so its runs use **random weights with the real Qwen2.5 configs**:
# the speed of fixed-length generation does not depend on the weight values. One row per run in the committed
# data:

# %% tags=["hide-input"]
pd.DataFrame(
    [
        {
            "run": run_id,
            "device": g.device.iloc[0],
            "weights": g.weights.iloc[0],
            "dtype": g.dtype.iloc[0],
            "models": ", ".join(sorted(set(g.model), key=lambda m: (len(m), m))),
            "new tokens": g.new_tokens.iloc[0],
            "cells": len(g),
        }
        for run_id, g in runs.groupby("run_id", sort=False)
    ]
).set_index("run")

# %%
print(
    f"H100 runs: {', '.join(h100.run_id.unique())}; "
    f"weights: {', '.join(h100.weights.unique())}"
)
assert set(h100.weights) == {"random"} and set(h100.dtype) == {"bfloat16"}

# %% [markdown]
# The first H100 run holds every implementation; the next two finished the cells its ten-minute limit cut (the
# 7B fast path at larger batches, and the 1.5B at batch 1). The H200 run is an earlier attempt, kept for the
# record, and the CPU run used the book's own model in float32.
#
# ## Two limits
#
# A decode step for a batch of $B$ sequences reads every weight once ($W$ bytes) and the cached keys and values
# of every row ($K$ bytes per token of context, $L$ tokens each). At a memory bandwidth $\beta$ (bytes per
# second), no implementation can decode faster than
#
# $$
# \text{decode tok/s} \;\le\; \frac{B\,\beta}{W + B\,L\,K}.
# $$
#
# A prefill of $B$ prompts of $n$ tokens does $F(B, n)$ FLOPs of matrix products, at most $R$ per second, and
# also has to read the weights once; it takes at least the longer of the two:
#
# $$
# t_{\text{prefill}} \;\ge\; \max\!\left(\frac{F(B, n)}{R},\; \frac{W}{\beta}\right),
# \qquad
# \text{prefill tok/s} \;\le\; \frac{B\,n}{t_{\text{prefill}}}.
# $$
#
# $W$, $K$ and $F$ follow from the config alone (`minqwen.model.sizes`); $\beta$ and $R$ are measured at the start of
# every run, as a device-to-device copy and a large bf16 matrix product. `bench.roofline` is the two formulas:

# %%
show_source(bench.roofline)

# %% [markdown]
# $F$ counts the projections of every token, causal attention over the visible keys, and the LM head once per
# row:

# %%
show_source(prefill_flops)

# %% [markdown]
# By hand, for the 7B at batch 1 with a 128-token prompt, with the rates that run measured ($L$ is the mean
# context over the 64 generated tokens):

# %%
cell = h100[(h100.impl == "roofline") & (h100.model == "7B")]
cell = cell[(cell.batch_size == 1) & (cell.prompt_len == 128)].iloc[0]
beta, R = cell.copy_bytes_per_s, cell.matmul_flops_per_s
W, K, L = weight_bytes_per_step("7B"), kv_cache_bytes_per_token("7B"), 128 + 64 / 2
decode = 1 * beta / (W + 1 * L * K)
t_prefill = max(prefill_flops("7B", 1, 128) / R, W / beta)
print(
    f"beta = {beta / 1e12:.2f} TB/s, R = {R / 1e12:.0f} TFLOP/s, W = {W / 1e9:.2f} GB"
)
print(f"decode <= {decode:.1f} tok/s; prefill <= {128 / t_prefill:,.0f} tok/s")
assert math.isclose(decode, cell.decode_tok_s) and math.isclose(
    128 / t_prefill, cell.prefill_tok_s
)

# %% [markdown]
# These are the `roofline` rows of the committed data. For this short prompt the prefill is bound by reading the
# weights, not by its FLOPs (an exercise finds where that switches).
#
# ## The method
#
# Every implementation is timed the same way: warm-up calls first (compilation, CUDA-graph capture), then five
# alternating calls of `generate(max_new_tokens=1)` and `generate(max_new_tokens=N)`, each ending in a device
# sync. The first call's median is the prefill; the difference of the medians is the decode of $N - 1$ tokens,
# so only generated tokens count. Peak memory is the largest allocation during the timed calls.

# %%
show_source(bench.measure)

# %% [markdown]
# The four implementations: transformers' `generate()` (`hf-eager`), the same with a static cache and
# `torch.compile` (`hf-static-compile`), minqwen's eager loop of this chapter (`minqwen-eager`), and
# `minqwen-fast`, the engine chapter 5 builds.
#
# ## Decode at batch 1: the targets of this chapter
#
# One side-by-side run holds every implementation at batch 1 with a 128-token prompt. Decoding one sequence is
# the hardest case for a GPU: each step multiplies a single row by every weight matrix, so the arithmetic units
# idle while the weights stream in, and anything else a step does (launching kernels, waiting for the host)
# shows up directly in the time per token.

# %%
TARGET_RUN = "20261126T070130Z"
batch1 = h100[
    (h100.run_id == TARGET_RUN) & (h100.batch_size == 1) & (h100.prompt_len == 128)
]
decode = batch1.pivot(index="model", columns="impl", values="decode_tok_s").loc[
    ["0.5B", "7B"], IMPLS
]
decode["fast / hf-static"] = decode["minqwen-fast"] / decode["hf-static-compile"]
decode["fast / roofline"] = decode["minqwen-fast"] / decode["roofline"]
decode.round(2)

# %% [markdown]
# The fast path decodes 3.06 times as fast as the compiled transformers path on the 0.5B model and 1.61 times on
# the 7B, and on the 7B it runs at 87% of what the memory bandwidth allows. The targets of this chapter were at
# least 2.5x and 1.3x, and 80% of the roofline on the 7B:

# %%
assert decode.loc["0.5B", "fast / hf-static"] >= 2.5
assert decode.loc["7B", "fast / hf-static"] >= 1.3
assert decode.loc["7B", "fast / roofline"] >= 0.8

# %% [markdown]
# Why is the small model so far from its roofline when the large one is close? Compare the time a step must take
# to read the weights with the time it does take:

# %%
for size in ("0.5B", "7B"):
    read_ms = weight_bytes_per_step(size) / beta * 1e3
    step_ms = 1e3 / decode.loc[size, "minqwen-fast"]
    layers = qwen25_config(size)["num_hidden_layers"]
    extra_us = (step_ms - read_ms) / layers * 1e3
    print(
        f"{size}: reading the weights {read_ms:.2f} ms, a step {step_ms:.2f} ms, "
        f"{extra_us:.0f} µs more per layer"
    )

# %% [markdown]
# Both models spend a similar fixed time per layer beyond reading its weights (printed above): a step still
# launches several kernels per layer, each taking a few microseconds however little it reads. For the 0.5B, whose
# layers are small, that fixed cost is most of the step; the 7B reads fourteen times more bytes per step through
# the same kernels, so reading dominates. The fraction of the roofline each implementation reaches, per model:

# %% tags=["hide-input"]
rooflines = h100[h100.impl == "roofline"][
    ["run_id", "model", "batch_size", "prompt_len", "decode_tok_s"]
]
fraction = (
    h100[(h100.batch_size == 1) & (h100.prompt_len == 128) & (h100.impl != "roofline")]
    .merge(
        rooflines,
        on=["run_id", "model", "batch_size", "prompt_len"],
        suffixes=("", "_roofline"),
    )
    .assign(fraction=lambda d: d.decode_tok_s / d.decode_tok_s_roofline)
    .pivot(index="model", columns="impl", values="fraction")
    .loc[["0.5B", "1.5B", "7B"], IMPLS[:-1]]
)
figures.roofline_fraction(fraction, "Batch-1 decode on an H100, bf16, prompt 128")

# %% tags=["remove-input", "hide-output"]
fraction.round(3)

# %% [markdown]
# ## Batching: decode
#
# A batch of $B$ rows reads the weights once per step for all of them, so by the first formula decode tok/s
# grows almost $B$-fold until the cache's share, $B\,L\,K$, catches up with $W$. At prompt 2,048 each row's cache
# adds to the bytes of every step, so the roofline rises more slowly. Solid lines are 128-token prompts, dashed
# ones 2,048:

# %% tags=["hide-input"]
cells = h100.drop_duplicates(["model", "impl", "batch_size", "prompt_len"], keep="last")
figures.by_batch(cells, "decode_tok_s", "decode tok/s", "decode, H100, bf16")

# %% [markdown]
# The eager loops, ours and transformers', grow with the batch but stay far below the roofline: their step time is
# set by Python launching hundreds of kernels, which does not change with $B$. `minqwen-fast` follows the
# roofline's shape. (`hf-static-compile` was measured at batch 1 only: transformers recompiles its whole model
# for every new batch size and cache length, 30 to 40 s each, which the ten-minute GPU call could not hold.) The
# 7B fast path against its roofline:

# %% tags=["hide-input"]
sweep = cells[(cells.model == "7B") & cells.impl.isin(["minqwen-fast", "roofline"])]
sweep.pivot_table(
    index=["prompt_len", "batch_size"], columns="impl", values="decode_tok_s"
).assign(fraction=lambda d: d["minqwen-fast"] / d["roofline"]).round(2)

# %% [markdown]
# ## Batching: prefill
#
# Prefill is the other half of a request, the wait before the first token. Its tok/s counts prompt tokens, and
# its bound is the second formula. By batch size and prompt length, for every implementation measured:

# %% tags=["hide-input"]
figures.by_batch(cells, "prefill_tok_s", "prefill tok/s", "prefill, H100, bf16")

# %% tags=["hide-input"]
prefill = cells.pivot_table(
    index=["model", "prompt_len", "batch_size"], columns="impl", values="prefill_tok_s"
)[IMPLS]
tokens = prefill.index.get_level_values("prompt_len") * prefill.index.get_level_values(
    "batch_size"
)
measured = prefill[IMPLS[:-1]]
spread = measured.max(axis=1) / measured.min(axis=1)
best = measured.max(axis=1) / prefill["roofline"]
is_7b = prefill.index.get_level_values("model") == "7B"
for label, rows in (("128 tokens", tokens == 128), (">= 2,048 tokens", tokens >= 2048)):
    print(
        f"cells of {label}: fastest / slowest up to {spread[rows].max():.1f}x; "
        f"7B at best {best[rows & is_7b].max():.0%} of its roofline"
    )
prefill.map(lambda x: "" if pd.isna(x) else f"{x:,.0f}")

# %% [markdown]
# A prefill of 128 tokens is short, and what surrounds the matrix products (launching kernels, a compiled path's
# checks) weighs: the implementations differ by up to the factor printed above, and all are far below the bound.
# A batch of a few thousand prompt tokens is a few large matrix products per layer, which every implementation
# hands to the same cuBLAS kernels: they come closer together (the spread printed above), and the 7B reaches the
# best fraction printed. The small 0.5B stays far below its bound, which assumes every FLOP runs at the rate of
# one large square product. When these runs were made, the fast path did nothing special here: its prefill ran
# the layer functions once per prompt, uncompiled. {doc}`../ch5/04_prefill` measures what changed since: the
# prompt in chunks, compiled, and captured as one CUDA graph.
#
# ## Peak memory
#
# What a cell needs at its peak: the weights, plus what grows with batch times prompt, the KV cache and the
# prefill's activations. The dotted line is the weights in bf16:

# %% tags=["hide-input"]
gib = cells.assign(peak_mem_gib=cells.peak_mem_bytes / 2**30)
weights_gib = {s: parameter_count(s) * 2 / 2**30 for s in ("0.5B", "7B")}
figures.by_batch(
    gib,
    "peak_mem_gib",
    "peak memory, GiB",
    "peak memory",
    weights=weights_gib,
    log_y=False,
)

# %% tags=["hide-input"]
(
    gib.pivot_table(
        index=["model", "prompt_len", "batch_size"],
        columns="impl",
        values="peak_mem_gib",
    )[IMPLS[:-1]].map(lambda x: "" if pd.isna(x) else f"{x:.2f}")
)

# %% [markdown]
# At batch 1 every implementation holds little more than the weights. Memory then grows with batch times prompt:
# the KV cache (the fast path's cache reserves whole buckets of 256 positions per row) and the prefill's intermediate
# tensors, which for 64 prompts of 2,048 tokens outgrow the 7B's weights. The eager loops were measured at prompt
# 2,048 only at batch 1: the cells of larger batches did not fit the GPU call's time.
#
# ## How the fast path gets there
#
# `minqwen-fast` is `minqwen.engine.fast.FastQwen2`: fused projections (q, k and v as one matrix, gate and up as
# another), a cache allocated once and written in place, no host sync per token (the CPU never waits to read the
# chosen token back from the GPU), one compiled layer, and each decode step captured as one {term}`CUDA graph`. Chapter 5 builds it
# move by move and measures what each move buys ({doc}`../ch5/02_graphs`), then takes it further. Its tokens
# equal the eager loop's in float32; in bf16 on a GPU they part from them only at near-ties.
#
# ## A small CPU run, here
#
# The fast path also runs on a CPU, without compiler or graphs: the same step, called from Python, with the eager
# loop's own sampler. A toy Qwen2 (the 0.5B's widths, two layers, an 8,192-token vocabulary, random weights)
# keeps this quick:

# %%
toy_folder = toy_checkpoint()

# %% [markdown]
# A bench run of the three implementations that run on a CPU, the same code the GPU runs went through. Its
# numbers change from run to run, so the cell's output is not compared; it still checks that every cell produced a
# rate.

# %% tags=["nbval-ignore-output"]
cpu_cells = bench.plan(
    [str(toy_folder)], ["hf-eager", "minqwen-eager", "minqwen-fast"], [1], [32]
)
cpu_run = pd.DataFrame(
    bench.run_bench(
        cpu_cells,
        new_tokens=12,
        repeats=5,
        device="cpu",
        dtype=torch.float32,
        progress=False,
        log=lambda message: None,
    )
)
assert len(cpu_run) == 4
assert (cpu_run.decode_tok_s > 0).all() and (cpu_run.prefill_tok_s > 0).all()
cpu_run[
    ["model", "impl", "batch_size", "prompt_len", "prefill_tok_s", "decode_tok_s"]
].round(1)

# %% [markdown]
# The committed CPU run used the embedded model (real weights, float32) on the book's 2-core build machine, shared
# with other work, so take it as rough (batch 1, a 32-token prompt, 16 new tokens). On a CPU our eager loop
# decodes at least as fast as transformers':

# %%
cpu = runs[(runs.dtype == "float32") & (runs.model == "embedded")]
cpu_decode = cpu.pivot(index="run_id", columns="impl", values="decode_tok_s")
assert (cpu_decode["minqwen-eager"] >= cpu_decode["hf-eager"]).all()
cpu_decode.round(2)

# %% [markdown]
# ## Summary
#
# - Decode is bound by memory: a step reads every weight and the cache once, so tok/s $\le B\beta / (W + BLK)$.
#   Prefill is bound by the larger of its FLOPs over the matrix rate and one read of the weights.
# - On an H100 at batch 1, transformers' compiled path reaches about half of the 7B's roofline; the fast path
#   reaches 87% on the 7B and three times transformers' compiled speed on the 0.5B.
# - A small model's batch-1 step is dominated by fixed per-kernel costs, not bytes; the fast path, which chapter 5
#   builds, removes most of them.
# - Batching multiplies decode tok/s almost by the batch until the cache's bytes catch up with the weights';
#   prefill is large matrix products for every implementation, and memory grows with batch times prompt.
#
# ## Exercises
#
# ````{exercise}
# :label: performance-batch64
# Is decoding at batch 64 still memory-bound? For the 7B at prompt 128, compute the roofline at batch 1 and 64
# with the first formula, and the arithmetic intensity of a decode step (about $2 \times$ parameters $\times B$
# FLOPs per step, over the bytes it reads) against the H100's ridge point $R / \beta$, the intensity above which
# a step would be bound by arithmetic instead.
# ````
#
# ```{solution-start} performance-batch64
# :class: dropdown
# ```


# %%
def decode_bound(batch, context=128 + 64 / 2):
    return batch * beta / (W + batch * context * K)


def intensity(batch, context=128 + 64 / 2):
    """FLOPs per byte of a decode step: 2 per parameter (W / 2 in bf16) per row."""
    return 2 * (W / 2) * batch / (W + batch * context * K)


ridge = R / beta
for batch in (1, 64):
    print(
        f"batch {batch:2}: roofline {decode_bound(batch):,.0f} tok/s, "
        f"{intensity(batch):.0f} FLOPs per byte (ridge {ridge:.0f})"
    )
for context in (128 + 32, 2048 + 32):
    crossing = next(
        (b for b in range(1, 10_000) if intensity(b, context) >= ridge), None
    )
    where = f"from batch {crossing}" if crossing else "never"
    print(
        f"context {context}: compute-bound {where}; "
        f"the intensity tends to W / (L K) = {W / (context * K):.0f}"
    )
batches = [2**k for k in range(11)]
figures.intensity(
    batches, [intensity(b) for b in batches], ridge, "7B decode step, H100 rates"
)
assert intensity(64) < ridge

# %% [markdown]
# Batch 64 multiplies the bound by about 60 (not 64: the cache's bytes grow with the batch), but a step still
# does only some tens of FLOPs per byte it reads, while the card could do a few hundred in the time it reads one
# byte. With short contexts a step turns compute-bound only at a few hundred rows; with 2,048 tokens of context
# it never does, because each row brings its own cache to read, and the intensity tends to $W / (L K)$, below
# the ridge. Decode stays memory-bound, which is why servers batch as much as memory allows and why the cache's
# bytes (GQA, quantised caches) matter as much as the weights'.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: performance-prefill-crossover
# For the 7B at batch 1, from which prompt length on does the prefill bound switch from reading the weights to
# arithmetic? Find the smallest $n$ with $F(1, n)/R \ge W/\beta$.
# ````
#
# ```{solution-start} performance-prefill-crossover
# :class: dropdown
# ```

# %%
n = next(n for n in range(1, 4096) if prefill_flops("7B", 1, n) / R >= W / beta)
print(f"from {n} prompt tokens on, the 7B prefill is bound by arithmetic")
assert prefill_flops("7B", 1, 128) / R < W / beta <= prefill_flops("7B", 1, n) / R

# %% [markdown]
# Each prompt token costs about $2W/2 = W$ FLOPs (two per parameter, one parameter per two bytes), so the switch
# comes near $n \approx R/\beta$, the ridge point itself: a prefill of $n$ tokens is a matrix product with $n$
# rows, and its intensity is $n$ FLOPs per byte of weights.
#
# ```{solution-end}
# ```
