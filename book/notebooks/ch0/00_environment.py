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
# # The machine, and which Qwen2.5 fits it
#
# Before any model runs we want two facts: what hardware this notebook is on, and how much memory each Qwen2.5
# size needs. The second follows from the configs alone, so we can answer it for every size, including the ones
# this book will never load.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - what `minqwen.tools.hardware.hardware_report()` tells you about the machine, and which of it is checked;
# - a memory model of inference: weights, {term}`KV cache` and activations, each from the config;
# - which Qwen2.5 size fits a 16, 24, 40, 80 or 141 GiB device, and when the context length, not the weights,
#   decides.
#
# **You need** nothing but the book's environment (`pip install -e .`); no model is loaded, so this page runs in
# seconds on any machine.
# ```

# %% tags=["hide-input", "nbval-ignore-output"]
# %matplotlib inline
from figures import environment as figures
from helpers import DEVICE, show_source, stamp

from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, parameter_count
from minqwen.tools.hardware import (
    HEADROOM,
    hardware_report,
    memory_estimate,
    recommend_size,
)

GIB = 2**30
report = hardware_report()
figures.report_table(report)

# %% [markdown]
# ## This machine
#
# The table above is `hardware_report()`: CPU, memory, GPU (if torch sees one) and the library versions. It
# depends on the machine, so the book never compares it between runs; it asserts only what must hold
# everywhere:

# %%
assert report.cpu_cores >= 1 and report.ram_total_bytes > 0
assert (report.gpu is None) == (report.gpu_memory_bytes is None)
print(
    f"the stamp names the device: {stamp().split()[0].startswith('device=')}; "
    f"device is cpu or cuda: {DEVICE in ('cpu', 'cuda')}"
)

# %% [markdown]
# ## A memory model
#
# Running a model takes room for three things. With $N$ parameters, $b$ bytes per number (2 in {term}`bf16`, 4 in
# float32), $L$ layers, $h_{kv}$ key/value heads of dimension $d$, and a context of $T$ tokens:
#
# $$
# \text{weights} = N b, \qquad
# \text{KV cache} = \underbrace{2 \, L \, h_{kv} \, d \, b}_{\text{bytes per token}} \cdot T, \qquad
# \text{activations} \approx T\,(4H + 2I)\,b + 4V.
# $$
#
# The cache holds a key and a value per layer, per key/value head, per token. The activations are the widest
# tensors alive during one prefill pass: the residual stream and q, k, v (about $4H$ numbers per token for hidden
# size $H$), the MLP's gate and up projections ($2I$), and the float32 logits of the last position ($V$ of them).
# `memory_estimate` is that sum:

# %%
show_source(memory_estimate)

# %% [markdown]
# For every released size, at a 4k context (the table is built by a folded helper from `memory_estimate`,
# `parameter_count` and `kv_cache_bytes_per_token`):

# %% tags=["hide-input"]
sizes = figures.sizes_table(context=4096)
sizes

# %% [markdown]
# The parameter counts are computed from the configs and match the published totals: 0.494B, 1.544B and 7.616B
# for 0.5B, 1.5B and 7B. {term}`GQA` is why the KV column is small: 7B keeps 4 key/value heads for its 28 query
# heads, so one token costs $2 \cdot 28 \cdot 4 \cdot 128 \cdot 2 = 57{,}344$ bytes.

# %%
assert [round(parameter_count(s) / 1e9, 3) for s in ("0.5B", "1.5B", "7B")] == [
    0.494,
    1.544,
    7.616,
]
assert kv_cache_bytes_per_token("7B") == 2 * 28 * 4 * 128 * 2

# %% [markdown]
# ## When the context decides
#
# The weights are paid once; the cache grows with every token. The two are equal at
# $T^\ast = N b \,/\, (2 L h_{kv} d b)$ tokens, which the config alone gives:

# %%
crossover = {
    size: memory_estimate(size)["weights"] // kv_cache_bytes_per_token(size)
    for size in SIZES
}
print(", ".join(f"{size}: {t / 1000:.0f}k" for size, t in crossover.items()))

# %% [markdown]
# Qwen2.5 reads 32k tokens natively and up to 128k with {term}`YaRN`. Within that range the cache overtakes the
# weights only for the two smallest sizes, whose crossover above is below 128k. The figure shows the totals against context
# length, with the memory of common devices, and what the total is made of at 4k and at 128k.

# %% tags=["hide-input"]
budgets = {"16 GiB": 16, "24 GiB": 24, "80 GiB": 80}
figures.memory_against_context(("0.5B", "1.5B", "7B", "14B", "32B"), budgets)

# %%
assert [s for s in SIZES if crossover[s] < 128 * 1024] == ["0.5B", "1.5B"]

# %% [markdown]
# At 4k the weights are nearly the whole bill for every size. At 128k the cache and the activations of one
# prefill pass over the whole context (which grow with it just as the cache does) take most of the memory of the
# small sizes, and a sizeable share even of 32B.

# %% [markdown]
# ## What fits where
#
# `recommend_size` picks the largest size whose estimate fits in 90% of the memory (`HEADROOM`), leaving the
# rest to the allocator, the CUDA context and library buffers:

# %%
show_source(recommend_size)

# %% tags=["hide-input"]
import pandas as pd

devices = {
    "laptop 16 GiB": 16,
    "RTX 4090 24 GiB": 24,
    "A100 40 GiB": 40,
    "H100 80 GiB": 80,
    "H200 141 GiB": 141,
}
advice = pd.DataFrame(
    {
        dtype: {
            name: recommend_size(gib * GIB, dtype) or "-"
            for name, gib in devices.items()
        }
        for dtype in ("bfloat16", "float32")
    }
).rename_axis("device, at 4k context")
advice

# %% [markdown]
# 72B fits no single card: its 135 GiB of bf16 weights alone are more than 90% of an H200, so it needs at least
# two GPUs, which `device_map="auto"` spreads it over.

# %%
assert recommend_size(80 * GIB) == "32B" and recommend_size(141 * GIB) == "32B"
assert memory_estimate("72B")["total"] > HEADROOM * 141 * GIB
assert recommend_size(1 * GIB, "float32") is None

# %% [markdown]
# And on this machine (the GPU's memory if there is one, else the RAM still available):

# %% tags=["nbval-ignore-output"]
where = "GPU" if report.gpu else "available RAM"
best = {d: recommend_size(report.accelerator_bytes, d) for d in ("bfloat16", "float32")}
print(
    f"{report.accelerator_bytes / GIB:.1f} GiB of {where}: "
    f"largest size {best['bfloat16']} in bf16, {best['float32']} in float32"
)
assert best["bfloat16"] is not None, "this machine cannot hold even Qwen2.5-0.5B"

# %% [markdown]
# ## Summary
#
# - `hardware_report()` describes the machine; the book asserts only what holds on every machine.
# - Memory for inference is weights ($Nb$) plus the KV cache ($2 L h_{kv} d b$ bytes per token) plus the
#   activations of one prefill pass; all three follow from `config.json`.
# - GQA keeps the cache small: 7B stores 57,344 bytes per token in bf16.
# - The weights are paid once, the cache per token: for the small sizes a long context costs more than the
#   weights.
# - With 10% headroom, 80 GiB holds up to 32B in bf16, and 72B needs two cards.
#
# ## Exercises
#
# ````{exercise}
# :label: environment-8gb
# A laptop GPU has 8 GiB. Which size fits at a 4k context in bf16, and in float32? Work it out from the table
# above by hand first (remember the 90%), then check with `recommend_size`.
# ````
#
# ```{solution-start} environment-8gb
# :class: dropdown
# ```

# %%
budget = 8 * GIB
for dtype in ("bfloat16", "float32"):
    fits = [s for s in SIZES if memory_estimate(s, dtype)["total"] <= HEADROOM * budget]
    print(f"{dtype}: {fits} -> {recommend_size(budget, dtype)}")
assert recommend_size(budget) == "3B" and recommend_size(budget, "float32") == "1.5B"

# %% [markdown]
# 90% of 8 GiB is 7.2 GiB: 3B's 6.1 GiB in bf16 fits and 7B's 14.8 GiB does not; in float32 every byte doubles,
# so 3B's 12.2 GiB is out and 1.5B's 6.3 GiB is the largest.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: environment-batch
# On an 80 GiB H100, how many 4k-token conversations can 7B serve at once in bf16? Each one needs its own KV
# cache and activations; the weights are shared. Check your answer with `memory_estimate(..., batch=n)`.
# ````
#
# ```{solution-start} environment-batch
# :class: dropdown
# ```

# %%
shared = memory_estimate("7B")["weights"]
per_sequence = memory_estimate("7B")["total"] - shared
by_hand = int((HEADROOM * 80 * GIB - shared) // per_sequence)
print(f"{per_sequence / GIB:.2f} GiB per sequence -> {by_hand} sequences")
assert memory_estimate("7B", batch=by_hand)["total"] <= HEADROOM * 80 * GIB
assert memory_estimate("7B", batch=by_hand + 1)["total"] > HEADROOM * 80 * GIB

# %% [markdown]
# Everything but the weights scales with the batch (the logits too, one row per sequence), so the count is the
# free memory after the weights divided by one sequence's share. This is why servers batch: the weights are read
# once per step for all of them.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: environment-gqa
# Without GQA, 7B would keep 28 key/value heads, one per query head. How many bytes per token would its cache
# take, and what would its crossover $T^\ast$ become?
# ````
#
# ```{solution-start} environment-gqa
# :class: dropdown
# ```

# %%
from minqwen.model.sizes import qwen25_config

config = qwen25_config("7B") | {"num_key_value_heads": 28}
without_gqa = kv_cache_bytes_per_token(config)
print(
    f"{without_gqa:,} bytes per token ({without_gqa // kv_cache_bytes_per_token('7B')}x), "
    f"crossover at {memory_estimate('7B')['weights'] // without_gqa / 1000:.0f}k tokens"
)
assert without_gqa == 7 * kv_cache_bytes_per_token("7B")

# %% [markdown]
# Seven times the cache: the crossover drops by the same factor, well inside the 128k context. GQA trades a
# little quality for a cache small enough that long contexts fit.
#
# ```{solution-end}
# ```
