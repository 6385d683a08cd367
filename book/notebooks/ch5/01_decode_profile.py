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
# # Where a decode step's time goes
#
# The previous chapter ({doc}`the baseline and the fast path <../ch4/05_performance>`) left the fast engine near the {term}`roofline` on the 7B model and far below it
# on the 0.5B. Both numbers are averages over a whole step. To make a step faster we need to know what it is
# made of: which kernels run, how long each takes, and how that compares with the bytes each one must read.
# This page takes one {term}`decode` step apart, first on this machine's CPU, then kernel by kernel on an H200.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the bytes a decode step must read, counted from the model's own tensors, and the lower bound on its time
#   they set;
# - how to split a step's time by module on a CPU, and see that it follows the bytes;
# - how a GPU step looks in the profiler: the kernels of one {term}`CUDA graph` replay, what each does, and the
#   bandwidth each achieves;
# - why the 0.5B model's step takes four times its roofline while the 7B's takes less than twice its own, and
#   what that says about the next step: fewer, fuller kernels.
#
# **You need** the roofline and the fast engine of {doc}`../ch4/05_performance`, and the {term}`KV cache` of
# {doc}`../ch4/02_manual_cache`. No GPU: the H200 profile is committed data; the CPU part runs the book's model
# here (under a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import decode_profile as figures
from helpers import BOOK, model_path, stamp

import time

import pandas as pd
import torch

import minqwen
from minqwen.model.sizes import (
    as_config,
    kv_cache_bytes_per_token,
    weight_bytes_per_step,
)

PROFILE = BOOK / "data" / "profile" / "decode-profile-nvidia-h200-2026-11-30.jsonl"
model = minqwen.Qwen2.from_pretrained(model_path())
config = model.config
print(stamp())

# %% [markdown]
# ## The bytes a step must read
#
# A decode step at batch 1 multiplies one row by every weight matrix, so it reads every weight once: $W$ bytes.
# Attention also reads the cached keys and values of all $T$ earlier tokens, $K$ bytes each. With a memory
# bandwidth of $\beta$ bytes per second, no step can be shorter than
#
# $$
# t_\text{step} \;\ge\; \frac{W + T\,K}{\beta}.
# $$
#
# $W$ is not a formula to trust blindly: count it from the tensors a step touches. The embedding table is read
# one row at a time, so it does not count; the LM head, a matrix of its own in the book's checkpoint, does:

# %%
parts = {
    "attention (with its projections)": [layer.self_attn for layer in model.layers],
    "MLP": [layer.mlp for layer in model.layers],
    "norms": [
        m
        for layer in model.layers
        for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    + [model.norm],
    "LM head": [model.lm_head],
}
bytes_of = {
    part: sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    for part, modules in parts.items()
}
W = sum(bytes_of.values())
assert W == weight_bytes_per_step(
    config, str(model.lm_head.weight.dtype).removeprefix("torch.")
)
K = kv_cache_bytes_per_token(config, "float32")
print(f"W = {W / 1e9:.3f} GB per step; K = {K:,} bytes per token")

# %% [markdown]
# The count agrees with `minqwen.model.sizes.weight_bytes_per_step`, which works from the config alone. The LM
# head is one matrix, yet it is a large share of a small model's bytes: 151,936 rows of the hidden size.
#
# ## On this CPU: time follows bytes
#
# Forward hooks on the same modules time each part of one cached decode step (the clock starts when a module is
# called and stops when it returns). The step runs on one thread (the least disturbed by other work on the
# machine), several times, and the median counts. Timings still vary with the machine and its load, so the output
# below is not compared between runs.


# %% tags=["hide-input"]
def timed_step(model, prompt_ids, repeats=5):
    """Median seconds per part of the second decode step (the first is the prefill)."""
    spent = {part: [] for part in parts}
    started = {}

    def before(part):
        return lambda module, args: started.__setitem__(module, time.perf_counter())

    def after(part):
        return lambda module, args, out: spent[part].append(
            time.perf_counter() - started[module]
        )

    handles = [
        h
        for part, modules in parts.items()
        for m in modules
        for h in (
            m.register_forward_pre_hook(before(part)),
            m.register_forward_hook(after(part)),
        )
    ]
    totals, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            steps = minqwen.generate_tokens(
                model, prompt_ids, 2, do_sample=False, eos_token_id=[]
            )
            next(steps)
            for times in spent.values():
                times.clear()
            start = time.perf_counter()
            next(steps)
            totals.append(
                (time.perf_counter() - start, {p: sum(t) for p, t in spent.items()})
            )
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    total, by_part = sorted(totals, key=lambda t: t[0])[len(totals) // 2]
    return total, by_part


# %% tags=["nbval-ignore-output"]
prompt_ids = torch.randint(
    0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)
)
total, by_part = timed_step(model, prompt_ids)
share = pd.DataFrame(
    {
        "share of bytes": pd.Series(bytes_of) / W,
        "share of time": pd.Series(by_part) / total,
    }
)
share.loc["everything else"] = [0.0, 1 - sum(by_part.values()) / total]
print(
    f"one decode step: {total * 1e3:.0f} ms, so {W / total / 1e9:.1f} GB/s of weights"
)
share.round(3)

# %% [markdown]
# On one CPU core the shares of time sit close to the shares of bytes: the MLP, which holds most of the weights,
# takes most of the time, and the LM head about its share. A step here is one long stream of weights through a
# core, and the rate printed above is that stream's speed. Norms are a rounding error in bytes and in time.
# On a GPU the picture is different, because the GPU reads memory so fast that everything else starts to show.
#
# ## On an H200: one step, kernel by kernel
#
# The GPU measurements come from `scripts/gpu_decode_profile.py`, run on one NVIDIA H200 with the real 0.5B and
# 7B configs and random weights (the speed of a step does not depend on the weight values), in bfloat16, batch 1.
# For each model and context length it records the fast engine's step time with CUDA graphs and without them,
# the step's roofline with the copy bandwidth measured in the same run, and every kernel of one graph replay as
# PyTorch's profiler saw it. The profiler tags each kernel with the launch that issued it; in a graph replay
# that is the one `cudaGraphLaunch`, so the kernels of one step are easy to pick out.

# %%
header, runs = figures.load(PROFILE)
hardware = header["hardware"]
beta = runs.copy_bytes_per_s[0]
print(
    f"{hardware['gpu']}, torch {hardware['torch']}, "
    f"copy bandwidth {beta / 1e12:.2f} TB/s"
)
runs[["size", "context", "graphs_step_ms", "eager_step_ms", "roofline_ms"]].round(3)

# %% [markdown]
# The profiler records each kernel by name: the compiler's are called `triton_...` after the operations they
# fuse, cuBLAS's `nvjet_...`; the figures below label them by what they do. Every layer launches the same kernels in the same order, so naming the
# kernels of one layer names them all. The step of the 0.5B at a 256-token context, the first layer
# enlarged below:

# %% tags=["hide-input"]
small = figures.kernels(runs.iloc[0])
title = (
    f"One decode step of the 0.5B on an H200: {len(small)} kernels, "
    f"{small.end_us.max() / 1e3:.2f} ms"
)
figures.timeline(small, title, until_us=48)

# %% [markdown]
# One layer, kernel by kernel, for both models:

# %% tags=["hide-input"]
large = figures.kernels(runs[(runs["size"] == "7B") & (runs.context == 256)].iloc[0])
per_layer = {}
for size, frame in (("0.5B", small), ("7B", large)):
    first = frame.name.tolist().index(
        frame.name[3], 4
    )  # the next layer starts with layer 0's first kernel
    per_layer[size] = frame.iloc[3:first].reset_index(drop=True)
layer_table = pd.DataFrame(
    {
        "kernel": per_layer["0.5B"].role,
        "kind": per_layer["0.5B"].kind,
        "0.5B µs": per_layer["0.5B"].dur_us,
        "7B µs": per_layer["7B"].dur_us,
    }
)
assert (per_layer["0.5B"].role == per_layer["7B"].role).all()
assert "bookkeeping" not in set(layer_table.kernel)
for size in ("0.5B", "7B"):
    by_kind = layer_table.groupby("kind")[f"{size} µs"].sum().round(1).to_dict()
    print(f"{size}, one layer, µs by kind: {by_kind}")
layer_table.round(2)

# %% [markdown]
# Twelve kernels a layer: four read weight matrices, three do attention over the cache, five do small work (norm
# statistics, RoPE, writing the new key and value). The compiler has already fused a lot: each norm is folded
# into the projection after it, the SiLU gate into the down projection, the residual adds into their
# projections. Yet in the 0.5B a layer's small and attention kernels together take over half as long as the four
# that read its weights, though they read almost nothing; in the 7B they are a small share.
#
# ## How fast does each kernel read?
#
# A kernel that reads a weight matrix of $b$ bytes in $t$ seconds achieves $b / t$. The copy bandwidth,
# measured in the same run, is what a kernel that only streams memory reaches:


# %% tags=["hide-input"]
def matrix_bytes(size: str) -> dict[str, int]:
    """Bytes of the weight matrix each weight-reading kernel reads, in bf16."""
    c = as_config(size)
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    return {
        "norm + q/k/v projection": 2 * c.hidden_size * (q + 2 * kv),
        "o projection + residual": 2 * q * c.hidden_size,
        "norm + gate/up projection": 2 * 2 * c.intermediate_size * c.hidden_size,
        "SiLU(gate)·up + down projection": 2 * c.intermediate_size * c.hidden_size,
        "final norm + LM head": 2 * c.vocab_size * c.hidden_size,
    }


points = []
for size, frame in (("0.5B", small), ("7B", large)):
    reads = matrix_bytes(size)
    for _, k in frame[frame.kind == "weights"].drop_duplicates("role").iterrows():
        median_us = frame[frame.role == k.role].dur_us.median()
        points.append(
            {
                "size": size,
                "role": k.role,
                "mb": reads[k.role] / 1e6,
                "gb_per_s": reads[k.role] / median_us / 1e3,
            }
        )
points = pd.DataFrame(points)
figures.bandwidth(points, runs.copy_bytes_per_s[0])

# %% tags=["remove-input", "hide-output"]
points.round(1)

# %% [markdown]
# The pattern is plain: a kernel reaches the copy bandwidth only when it reads a few hundred megabytes (both LM
# heads, the 7B's gate/up; the heads even pass it a little, since a kernel that only reads streams slightly
# better than a copy, which reads and writes at once). At a few megabytes, the 0.5B's q/k/v and o projections,
# it reaches a fifth of it or less. A kernel needs time to start, to spread its blocks over the 132 multiprocessors, and to drain its last
# blocks; a 2 MB read at full speed would take half a microsecond, far less than those fixed costs.
#
# ## The step's budget
#
# Split each step's time into: the weight-reading kernels at full copy bandwidth (the part no engine can
# avoid), what those kernels take beyond that, attention, the small kernels, the once-a-step kernels, and the
# gaps between kernels, where the GPU runs nothing:

# %% tags=["hide-input"]
budget = {}
for _, run in runs.iterrows():
    frame = figures.kernels(run)
    by_kind = frame.groupby("kind").dur_us.sum()
    at_bandwidth = weight_bytes_per_step(run["size"]) / run.copy_bytes_per_s * 1e6
    span = frame.end_us.max()
    budget[f"{run['size']}, context {run.context:,}"] = {
        "weights at copy bandwidth": at_bandwidth,
        "weight kernels beyond it": by_kind["weights"] - at_bandwidth,
        "attention": by_kind["attention"],
        "small kernels": by_kind["small"],
        "once a step": by_kind["step"],
        "gaps between kernels": span - by_kind.sum(),
    }
    assert (
        abs(sum(budget[f"{run['size']}, context {run.context:,}"].values()) - span)
        < 1e-6
    )
budget = pd.DataFrame(budget).T
figures.budget(budget, "One decode step on an H200, batch 1, bf16")

# %% tags=["remove-input", "hide-output"]
budget.round(1)

# %%
for name in ("0.5B, context 256", "7B, context 256"):
    row = budget.loc[name]
    share = row["weights at copy bandwidth"] / row.sum()
    print(
        f"{name}: {row.sum():.0f} µs, "
        f"{share:.0%} of it reading the weights at full speed"
    )

# %% [markdown]
# The profiled replay of the 0.5B (1,059 µs) is longer than the step timed without the profiler (0.939 ms in the
# table above): profiling costs a little, so read the budget's shares rather than its absolute times.
#
# For the 7B, two thirds of a step is the reading no engine can avoid, 14 GB of weights; the weight kernels take
# about 30% longer than a plain copy of the same bytes, most of it in the down projection (the figure above).
# For the 0.5B, reading its weights at full speed would take under a quarter of the step.
# The rest is spread thin: the weight kernels' shortfall, attention's three small kernels per layer, the five
# small kernels per layer, and about half a microsecond of gap between consecutive kernels. The gaps are short,
# because a CUDA graph launches the next kernel without the host, but there are 300 of them. No single kernel is
# the problem; their number and their size are.
#
# ## Longer contexts
#
# With a longer context, attention reads more of the cache each step, and the roofline's $T\,K$ term grows. For
# both models, the step with graphs, without them (the same fused functions called from Python), and the
# roofline:

# %% tags=["hide-input"]
steps = runs.rename(
    columns={
        "graphs_step_ms": "graphs",
        "eager_step_ms": "eager",
        "roofline_ms": "roofline",
    }
)
figures.by_context(steps)

# %% tags=["hide-input"]
steps.assign(**{"fraction of the roofline": steps.roofline / steps.graphs})[
    ["size", "context", "graphs", "roofline", "fraction of the roofline"]
].round(3)

# %% [markdown]
# Without graphs a step costs 17 to 32 ms whatever the model: the Python that launches 300 kernels, not the GPU,
# sets the pace, which is why the fast engine captures the step as a graph ({doc}`02_graphs`). With graphs, the time grows with the
# context faster than the roofline does: the attention kernels read the cache at a fraction of the bandwidth,
# so at 16,384 tokens the 0.5B reaches about an eighth of its roofline. (This profile measured the engine as it
# was then, with attention as two matrix products; {doc}`03_split_attention` replaces them with a kernel that
# reads the cache across the whole GPU, now the default on CUDA.)

# %%
fraction = (steps.roofline / steps.graphs).round(3).tolist()
assert steps.groupby("size").graphs.apply(lambda s: s.is_monotonic_increasing).all()
print(f"fraction of the roofline, in the order of the table: {fraction}")

# %% [markdown]
# ## Summary
#
# - A decode step must read every weight and the cache once: $t_\text{step} \ge (W + LK)/\beta$, with $W$
#   counted from the tensors a step touches.
# - On a CPU, time follows bytes: each part of the model takes about its share of the weights.
# - On an H200 the fast engine's step is a CUDA graph of 12 kernels per layer: four read weights, three attend,
#   five do small work. Kernels that read a few megabytes reach a fifth of the copy bandwidth or less.
# - The 7B's step is mostly the unavoidable weight reading; the 0.5B's is mostly fixed per-kernel costs, spread
#   over 300 kernels. Long contexts add attention kernels that read the cache slowly.
# - So the next gains come from fewer, fuller kernels: fusing the small kernels into the large ones, and
#   attention that reads the cache at full speed.
#
# ## Exercises
#
# ````{exercise}
# :label: decode-profile-cache-share
# At what context does the KV cache hold as many bytes as the weights, for the 0.5B and for the 7B (bf16)? Which
# model's decode becomes a cache-reading problem first, and why?
# ````
#
# ```{solution-start} decode-profile-cache-share
# :class: dropdown
# ```

# %%
for size in ("0.5B", "7B"):
    even = weight_bytes_per_step(size) / kv_cache_bytes_per_token(size)
    print(f"{size}: the cache outweighs the weights beyond {even:,.0f} tokens")

# %% [markdown]
# The 0.5B keeps 2 kv heads of 64 dimensions in 24 layers, 12 KiB a token, against 1 GB of weights; the 7B keeps 4
# kv heads of 128 in 28 layers, 56 KiB a token, against 14 GB (this page's $W$, without the embedding). The 0.5B's cache catches up with its weights at
# a shorter context, so its long-context decode is a cache-reading problem sooner.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: decode-profile-fused
# Suppose one fused kernel per layer did the work of all twelve, reading its weights at the copy bandwidth, with
# attention and the once-a-step kernels unchanged and no gaps. How long would the 0.5B's step take at a
# 256-token context, and what fraction of its roofline would it reach?
# ````
#
# ```{solution-start} decode-profile-fused
# :class: dropdown
# ```

# %%
row = budget.loc["0.5B, context 256"]
fused = row["weights at copy bandwidth"] + row["attention"] + row["once a step"]
roofline_us = runs.roofline_ms[0] * 1e3
print(
    f"fused step: {fused:.0f} µs against {row.sum():.0f} µs measured; "
    f"{roofline_us / fused:.0%} of the roofline"
)

# %% [markdown]
# Most of the gain would come from the small kernels and the shortfall of the weight kernels; what remains is
# attention and the few kernels that run once a step. That is roughly what a persistent "megakernel" aims for.
#
# ```{solution-end}
# ```
