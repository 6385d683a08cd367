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
# Before any model runs, we want two facts: what hardware this notebook is on, and how much memory each
# Qwen2.5 size needs. The second follows from the configs alone, so we can answer it for every size, including
# the ones we will never load here.

# %%
# NBVAL_IGNORE_OUTPUT
from helpers import DEVICE, show_source, stamp

import pandas as pd

from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, parameter_count
from minqwen.tools.hardware import (
    HEADROOM,
    hardware_report,
    memory_estimate,
    recommend_size,
)

report = hardware_report()
GIB = 2**30
pd.Series(
    {
        k: (f"{v / GIB:.1f} GiB" if k.endswith("_bytes") and v else v)
        for k, v in report.to_dict().items()
    }
)

# %% [markdown]
# The report above depends on the machine, so the book does not compare it between runs; it checks only what
# must hold everywhere.

# %%
assert report.cpu_cores >= 1 and report.ram_total_bytes > 0
assert (report.gpu is None) == (report.gpu_memory_bytes is None)
print(stamp().split()[0].startswith("device="), DEVICE in ("cpu", "cuda"))

# %% [markdown]
# ## A memory model
#
# Running a model needs room for three things:
#
# - **weights**: parameters x bytes per parameter (2 in bf16, 4 in fp32);
# - **the KV cache**: for every layer, a key and a value vector per kv head per token:
#   `2 x layers x kv_heads x head_dim x bytes` per token;
# - **activations**: the widest tensors alive during one prefill pass.

# %%
show_source(memory_estimate)

# %%
rows = []
for size in SIZES:
    est = memory_estimate(size, "bfloat16", context=4096)
    rows.append(
        {
            "size": size,
            "parameters (B)": round(parameter_count(size) / 1e9, 3),
            "KV bytes/token": kv_cache_bytes_per_token(size, "bfloat16"),
            "weights GiB": round(est["weights"] / GIB, 2),
            "KV @4k GiB": round(est["kv_cache"] / GIB, 2),
            "activations GiB": round(est["activations"] / GIB, 2),
            "total bf16 GiB": round(est["total"] / GIB, 2),
            "total fp32 GiB": round(
                memory_estimate(size, "float32", context=4096)["total"] / GIB, 2
            ),
        }
    )
sizes = pd.DataFrame(rows).set_index("size")
sizes

# %% [markdown]
# The parameter counts come from the configs and match the published totals: 0.494B, 1.544B and 7.616B for
# 0.5B, 1.5B and 7B. Grouped-query attention is why the KV cache is small: 7B keeps only 4 kv heads for 28
# query heads.

# %%
assert [round(parameter_count(s) / 1e9, 3) for s in ("0.5B", "1.5B", "7B")] == [
    0.494,
    1.544,
    7.616,
]
assert kv_cache_bytes_per_token("7B") == 2 * 28 * 4 * 128 * 2

# %% [markdown]
# ## What fits where
#
# `recommend_size` picks the largest size whose estimate fits in 90% of the memory, leaving room for the
# allocator and the CUDA context. Here it is for a few common memory sizes, at a 4k context. Note that 72B
# fits no single card: its 145 GB of bf16 weights need at least two, which `device_map="auto"` spreads.

# %%
show_source(recommend_size)

# %%
budgets = {
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
            for name, gib in budgets.items()
        }
        for dtype in ("bfloat16", "float32")
    }
)
advice

# %%
assert (
    recommend_size(80 * GIB, "bfloat16") == "32B"
    and recommend_size(141 * GIB, "bfloat16") == "32B"
)
assert (
    memory_estimate("72B")["total"] > HEADROOM * 141 * GIB
)  # 72B in bf16 needs two cards
assert recommend_size(1 * GIB, "float32") is None

# %% [markdown]
# The same estimate against context length shows when the KV cache, not the weights, decides: past about 100k
# tokens 7B's cache outweighs its weights.

# %%
import matplotlib.pyplot as plt

contexts = [2**k for k in range(10, 18)]
fig, ax = plt.subplots()
for size in ("0.5B", "1.5B", "7B", "14B"):
    ax.plot(
        contexts,
        [memory_estimate(size, "bfloat16", c)["total"] / GIB for c in contexts],
        marker="o",
        label=size,
    )
ax.axhline(80 * HEADROOM, color="gray", ls="--", label="90% of 80 GiB")
ax.set(
    xscale="log",
    yscale="log",
    xlabel="context length (tokens)",
    ylabel="GiB (bf16, batch 1)",
    title="Memory needed against context length",
)
ax.legend()
plt.show()

# %% [markdown]
# And on this machine:

# %%
# NBVAL_IGNORE_OUTPUT
where = "GPU" if report.gpu else "available RAM"
best = {d: recommend_size(report.accelerator_bytes, d) for d in ("bfloat16", "float32")}
print(
    f"{report.accelerator_bytes / GIB:.1f} GiB of {where}: largest size bf16 {best['bfloat16']}, fp32 {best['float32']}"
)
assert best["bfloat16"] is not None, "this machine cannot hold even Qwen2.5-0.5B"
