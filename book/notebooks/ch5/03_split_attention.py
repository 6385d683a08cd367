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
# # Attention over the cache, split across the GPU
#
# The profile of the previous page ({doc}`where a decode step's time goes <01_decode_profile>`) found that at
# long contexts attention takes most of a small model's decode step,
# though it reads little: at 16,384 tokens the 0.5B's attention reads 8 MB of cache per layer and takes about 57
# µs to do it, under a twentieth of the copy bandwidth. This page writes the standard remedy, split attention (known
# as flash-decoding), as a Triton kernel, proves the arithmetic that makes it exact, checks the kernel here on
# the CPU, and measures it on an H200, where it shows the next bottleneck.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - why two matrix products leave most of a GPU idle when a few query rows meet a long cache;
# - how a softmax over a long row splits into parts and merges back exactly, with the formula beside its code;
# - how the kernel does each part with an online softmax, in about forty lines of Triton, and how to test a
#   GPU kernel without a GPU, in Triton's interpreter;
# - what it bought on an H200: first the merge became the bottleneck, then a second kernel removed it, and
#   long contexts stopped costing a 7B step more than a fifth of its time.
#
# **You need** the profile of {doc}`01_decode_profile`, grouped-query attention ({doc}`../ch3/03_gqa`)
# and the static cache of the fast engine ({doc}`02_graphs`). No GPU: the kernel runs here in
# Triton's interpreter, and the H200 measurements are committed data (about a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import decode_profile as figures
from helpers import BOOK, model_path, show_source, stamp

import pandas as pd
import torch

import minqwen
from minqwen.engine import decode_attention
from minqwen.engine.decode_attention import (
    merge_parts,
    merge_splits,
    split_attention,
    split_plan,
)
from minqwen.engine.fast import FastQwen2, matmul_attention

PROFILES = BOOK / "data" / "profile"
print(stamp())

# %% [markdown]
# ## Why the matrix products leave the GPU idle
#
# At batch 1 the 0.5B model has 2 kv heads, each shared by 7 query heads. Attention for one kv head is a
# $7 \times 64$ block of queries against a $T \times 64$ block of cached keys, a softmax over $T$, then the
# weights against $T \times 64$ values. The fast engine writes it as two batched matrix products:

# %%
show_source(matmul_attention)

# %% [markdown]
# A matrix-product kernel divides its output into tiles and gives each tile to one block of threads. Here the
# output of the first product is $7 \times T$ per kv head: with tiles along $T$ it can spread, but the second
# product's output is only $7 \times 64$ per kv head, two tiles' worth for the whole batch, and each of those
# blocks must read all $T$ values alone. An H200 has 132 multiprocessors; a few of them stream the cache while the
# rest wait. The profile agrees: the attention kernels' time grows with the context far faster than their bytes
# would require.

# %% tags=["hide-input"]
_, first = figures.load(PROFILES / "decode-profile-nvidia-h200-2026-11-30.jsonl")
small = first[first["size"] == "0.5B"]
attention_us = [
    figures.kernels(run).query("kind == 'attention'").dur_us.sum() / 24
    for _, run in small.iterrows()
]
cache_mb = (
    small.context * 2 * 2 * 64 * 2 / 1e6
)  # keys and values, 2 kv heads of 64, bf16
table = pd.DataFrame(
    {
        "context": small.context,
        "cache MB per layer": cache_mb,
        "attention µs per layer": attention_us,
    }
)
table["GB/s"] = table["cache MB per layer"] / table["attention µs per layer"] * 1e3
table.round(1)

# %% [markdown]
# ## Splitting a softmax, exactly
#
# For one query row with scores $s_1 \dots s_T$ and values $v_1 \dots v_T$, attention is
#
# $$
# o = \frac{\sum_j e^{s_j} v_j}{\sum_j e^{s_j}}.
# $$
#
# Cut the positions into parts $P_1 \dots P_S$. Each part, on its own, keeps three things: its largest score
# $m_s$, its sum of exponentials $\ell_s = \sum_{j \in P_s} e^{s_j - m_s}$, and its weighted sum of values
# $a_s = \sum_{j \in P_s} e^{s_j - m_s} v_j$. Subtracting the part's maximum keeps every exponential at most 1,
# so nothing overflows. With $M = \max_s m_s$, multiplying each part's sums by $e^{m_s - M}$ puts them all on the
# same scale, and
#
# $$
# o = \frac{\sum_s e^{m_s - M}\, a_s}{\sum_s e^{m_s - M}\, \ell_s}.
# $$
#
# Nothing is approximated: each factor $e^{s_j - m_s} e^{m_s - M}$ is $e^{s_j - M}$, and $e^{-M}$ cancels
# between numerator and denominator. `merge_splits` is that formula:

# %%
show_source(merge_splits)

# %% [markdown]
# Two halves of a random row, attended separately and merged, give the softmax of the whole row:

# %%
g = torch.Generator().manual_seed(0)
scores = torch.randn(3, 40, generator=g, dtype=torch.float64) * 4
values = torch.randn(40, 8, generator=g, dtype=torch.float64)
acc, stats = [], []
for part in (slice(0, 17), slice(17, 40)):
    m = scores[:, part].amax(-1)
    e = torch.exp(scores[:, part] - m[:, None])
    acc.append(e @ values[part])
    stats.append(torch.stack([m, e.sum(-1)], -1))
merged = merge_splits(torch.stack(acc), torch.stack(stats))
error = (merged - scores.softmax(-1) @ values).abs().max().item()
print(f"merged parts against the whole softmax: largest difference {error:.1e}")
assert error < 1e-14

# %% [markdown]
# ## The kernel
#
# One program of the kernel handles one (row, kv head, part). It loads the kv head's query rows once, then walks
# its part of the cache `BLOCK_N` positions at a time, keeping $m$, $\ell$ and $a$ for each query row in
# registers. When a block raises the running maximum from $m$ to $m'$, the sums so far are rescaled by
# $e^{m - m'}$: the same merge, one block at a time (the online softmax of FlashAttention). Masked positions
# (left padding, slots after the current token) get a score of $-\infty$. At the end the program writes its
# $a$, $m$ and $\ell$, and `merge_splits` combines the parts.

# %%
show_source(decode_attention._attend_part.fn)

# %% [markdown]
# `tl.dot` needs at least 16 rows, so the 7 query heads of a group are padded to 16 with zeros and dropped at
# the end. How many parts: enough for about two programs per multiprocessor, each part a whole number of blocks,
# so a short cache gets fewer.

# %%
show_source(split_plan)
for context in (256, 4096, 16384):
    splits, split_len = split_plan(2, context)
    print(
        f"context {context:>6,}: {splits:>3} parts of {split_len:>4} positions, {2 * splits} programs"
    )

# %% [markdown]
# ## Checked here, without a GPU
#
# Triton has an interpreter that runs a kernel's program instances one by one on CPU tensors, with NumPy. It is
# slow, but it runs exactly the code above, so the kernel can be checked on any machine (the tests in
# `tests/test_ch5_decode_attention.py` do so in CI). Against float64 attention, in float32, with left padding
# and unseen slots, for several part lengths:

# %% tags=["nbval-ignore-output"]
g = torch.Generator().manual_seed(1)
q = torch.randn(2, 2, 7, 64, generator=g)
keys, values = (
    torch.randn(2, 2, 1000, 64, generator=g),
    torch.randn(2, 2, 1000, 64, generator=g),
)
visible = torch.ones(2, 1000, dtype=torch.bool)
visible[0, :30], visible[:, 900:] = False, False
exact = (q.double() @ keys.double().transpose(-1, -2) / 8).masked_fill(
    ~visible[:, None, None], float("-inf")
)
exact = exact.softmax(-1) @ values.double()
errors = {
    split_len: (
        split_attention(q, keys, values, visible, 1 / 8, split_len=split_len) - exact
    )
    .abs()
    .max()
    .item()
    for split_len in (64, 256, 1024)
}
print({n: f"{e:.1e}" for n, e in errors.items()})
assert max(errors.values()) < 1e-6

# %% [markdown]
# And inside the engine: the fast engine with `split_attention=True` writes the book's model's greedy tokens,
# the same as the eager loop's (on the CPU the engine runs uncompiled, so this is the kernel itself at work):

# %%
model = minqwen.Qwen2.from_pretrained(model_path())
prompt = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
fast = FastQwen2(model, bucket=64, split_attention=True)
ours = fast.generate(prompt, 6, do_sample=False, eos_token_id=[])
assert torch.equal(
    ours, minqwen.generate(model, prompt, 6, do_sample=False, eos_token_id=[])
)
print("split attention in the fast engine: the eager loop's 6 tokens")

# %% [markdown]
# ## On an H200, first try
#
# The second profile run measured the 0.5B model with the split kernel, in the same way as
# {doc}`01_decode_profile` (`scripts/gpu_decode_profile.py`, bf16, random weights, one replay's kernels). Its 7B
# cells did not finish inside the GPU call's time limit. The run took place on another H200, and its
# matrix-product path was a variant that the compiler handled worse (see `book/data/bench/NOTES.md`), so the
# fair baseline is the first run's attention kernels: kernel times, which do not depend on the rest of the step.
# In that run the merge was `merge_splits` above, PyTorch left to the compiler. Attention per decode step, by
# kernel:

# %% tags=["hide-input"]
_, second = figures.load(PROFILES / "decode-split-nvidia-h200-2026-11-30.jsonl")
parts = {}
for _, run in first[first["size"] == "0.5B"].iterrows():
    frame = figures.kernels(run)
    parts[f"matrix products, {run.context:,}"] = {
        "matrix products and softmax": frame.query("kind == 'attention'").dur_us.sum()
    }
for _, run in second[second.context.isin(first.context)].iterrows():
    by_role = figures.kernels(run, "split_kernels").groupby("role").dur_us.sum()
    parts[f"split, {run.context:,}"] = {
        "split kernel: the parts": by_role["split attention: the parts"],
        "merge: maxima and sums": by_role["split attention: merge maxima"]
        + by_role["split attention: merge sums"],
    }
parts = pd.DataFrame(parts).T.fillna(0.0)
parts = parts.loc[
    sorted(parts.index, key=lambda n: (int(n.split(", ")[1].replace(",", "")), n))
]
figures.budget(parts, "Attention in one decode step of the 0.5B, H200, bf16")

# %% tags=["remove-input", "hide-output"]
parts.round(1)

# %%
long = parts.loc[["matrix products, 16,384", "split, 16,384"]]
kernel = long.loc["split, 16,384", "split kernel: the parts"]
merge = long.loc["split, 16,384", "merge: maxima and sums"]
before = long.loc["matrix products, 16,384"].sum()
print(
    f"16,384 tokens: the parts {kernel:.0f} µs, the merge {merge:.0f} µs; "
    f"the matrix products took {before:.0f} µs"
)
assert kernel < before / 5 and merge > kernel

# %% [markdown]
# The kernel did what it was written for: at 16,384 tokens the parts took a tenth of the time of the matrix
# products. But the merge became two reductions over the parts that cost more than the kernel itself, and at
# short contexts the split path was slower overall. The bottleneck had moved, and the profile said where.

# %% [markdown]
# ## The merge as a kernel too
#
# The merge reads little: per query row, one $m$, one $\ell$ and one $a$ of `head_dim` numbers per part, about
# 30 kB for a 7B row at 30,000 tokens. A second Triton kernel does it, one program per query row. It walks the
# parts a block at a time with the same running maximum and rescaling as the attention kernel, so the formula
# holds for any number of parts:

# %%
show_source(decode_attention._merge_parts.fn)

# %% [markdown]
# How many parts one loop iteration reads matters more than anything inside it, because each iteration waits
# for its loads from memory. A probe on an H200 timed the merge alone with blocks of 32 to 256 parts and 1 to 8
# warps (a warp is 32 threads; a program runs on a few of them): reading 32 parts at a time, the merge of 128
# parts took about 6 µs; reading them all at once, 2.3 to 2.6 µs (`book/data/bench/NOTES.md`). So the launch
# picks a block that holds every part, up to `MERGE_BLOCK` (128); only a cache cut into more parts than that
# takes a second iteration:

# %%
show_source(merge_parts)

# %% [markdown]
# In the interpreter, the kernel gives the formula's result over parts as the attention kernel leaves them, some
# of them empty:

# %%
g = torch.Generator().manual_seed(3)
acc = torch.randn(1, 2, 300, 16, 64, generator=g)
m = torch.randn(1, 2, 300, 16, generator=g) * 4
m[:, :, :40] = float("-inf")  # parts with no visible key have a = 0 and l = 0
acc[:, :, :40] = 0.0
size = torch.rand(1, 2, 300, 16, generator=g) + 0.5
size[:, :, :40] = 0.0
stats = torch.stack([m, size], -1)
kernel_merge = merge_parts(acc, stats, 7, torch.float32)
error = (kernel_merge - merge_splits(acc, stats)[:, :, :7]).abs().max().item()
print(f"merge kernel against merge_splits, 300 parts: largest difference {error:.1e}")
assert error < 1e-6

# %% [markdown]
# ## Measured again
#
# Two more runs of the same script on H200s, with the final code: the 0.5B and 1.5B models in one, the 7B in the
# other, each at 256, 8,192 and 30,000 tokens of context, with the matrix products and the split kernel side by
# side, each compiled and captured as a CUDA graph. The step time here is one graph replay as the profiler saw
# it, from its first kernel's start to its last kernel's end. The script also times a step as the difference
# between two generations, but at 30,000 tokens that subtracts two prefills, and their jitter was larger than the
# steps (NOTES.md). The roofline is each run's own: its measured copy bandwidth over the bytes of the weights and
# the cache.

# %% tags=["hide-input"]
_, small_runs = figures.load(
    PROFILES / "decode-merge-0.5B-1.5B-nvidia-h200-2026-11-30.jsonl"
)
_, large_runs = figures.load(PROFILES / "decode-merge-7B-nvidia-h200-2026-11-30.jsonl")
merged_runs = pd.concat([small_runs, large_runs[large_runs["size"] == "7B"]])
steps = figures.replay_steps(merged_runs)
figures.by_context(steps, columns=("matrix products", "split", "roofline"))

# %% tags=["hide-input"]
steps["split, % of roofline"] = (100 * steps.roofline / steps.split).round().astype(int)
table = steps.set_index(["size", "context"])
ms = {
    "matrix products": "matrix products ms",
    "split": "split ms",
    "roofline": "roofline ms",
}
table[list(ms)].rename(columns=ms).round(2).join(
    table[["split, % of roofline", "merge µs per layer"]].round(1)
)

# %% [markdown]
# Attention no longer grows with the context the way it did. At 30,000 tokens the split kernel and its merge
# take a fraction of the matrix products' time, and the merge takes 2 to 3 µs a layer. Every model's step is
# faster with them at every context measured, or equal at the shortest, but not only because of attention: the
# two builds compiled the weight kernels differently too (the compiler's tuning varies from one compilation to
# the next, NOTES.md), and in these runs the split build's were faster, by up to 0.6 ms at 7B. The attention
# columns are the fair comparison; the step columns show what each build did as compiled. For the chapter's
# targets:

# %%
at_30k = steps[steps.context == 30000].set_index("size")
attention = ["attention µs, matrix products", "attention µs, split + merge"]
print(at_30k[attention].round(0).to_string())
assert (steps.split <= steps["matrix products"] * 1.02).all()
assert (at_30k[attention[1]] < at_30k[attention[0]] / 4).all()
large = steps[(steps["size"] == "7B") & (steps.context > 256)].set_index("context")
# The matrix-product build's step with its attention swapped for the split kernel's.
swapped = large["matrix products"] - (large[attention[0]] - large[attention[1]]) / 1e3
print(
    "7B at 8,192 and 30,000 tokens, % of the roofline: split build "
    + ", ".join(f"{p:.0f}%" for p in 100 * large.roofline / large.split)
    + "; matrix-product build with split attention "
    + ", ".join(f"{p:.0f}%" for p in 100 * large.roofline / swapped)
)

# %% [markdown]
# - **7B**: as compiled, the split build's step at 8,192 and 30,000 tokens reaches 83% and 81% of its roofline,
#   against 56% and 31% with the matrix products; with the other build's weight kernels it would be 77% and
#   70%. The roofline itself depends on the copy bandwidth a run measures: on another H200 (4.14 TB/s, against
#   this run's 3.80), similar step times were 75 to 77% of it.
# - **0.5B**: a step costs about the same at 30,000 tokens as at 256. What is left is the fixed cost of 276
#   small kernels ({doc}`01_decode_profile`), which the context never touched.
# - **1.5B**: its step still grows by about 0.6 ms from 256 to 30,000 tokens, most of it attention (0.18 to
#   0.63 ms), which reads twice the 0.5B's cache per token with heads of 128.
#
# So the fast engine now uses the split kernel by default wherever it runs: on CUDA with Triton, for heads whose
# size is a power of two (every Qwen2.5 model's is). `FastQwen2(model, split_attention=False)` brings back the
# matrix products; on the CPU they are the only choice, since the interpreter is far too slow to serve.
#
# Accuracy was never the problem. Against float64 attention on random data, the split kernel's bf16 error is
# below that of the matrix products in every run and at every context measured, because its scores never round
# to bf16:

# %%
errors = pd.concat(
    [
        second.assign(size="0.5B", run="first try"),
        merged_runs.assign(run="merge kernel"),
    ]
)
errors = errors.set_index(["run", "size", "context"])[
    ["matmul_max_error", "split_max_error"]
]
print(errors.map(lambda e: f"{e:.1e}").to_string())
assert (errors.split_max_error <= errors.matmul_max_error).all()

# %% [markdown]
# ## Summary
#
# - A few query rows against a long cache give matrix-product kernels too few tiles: most of the GPU waits, and
#   attention reads the cache at a small fraction of the bandwidth.
# - Split attention cuts the cache into parts, attends to each with an online softmax, and merges them exactly:
#   $o = \sum_s e^{m_s - M} a_s / \sum_s e^{m_s - M} \ell_s$.
# - The Triton kernel runs on the CPU in Triton's interpreter, so it is tested against float64 without a GPU.
# - On an H200 the parts took a tenth of the matrix products' time at 16,384 tokens, but the merge, compiled from
#   PyTorch, cost more than the kernel: measured, the bottleneck moved.
# - A second kernel, reading up to 128 parts per loop iteration, merges in 2 to 3 µs a layer. With both, a 7B
#   step at 30,000 tokens took 5.1 ms instead of 13.4 (part of it from differently compiled weight kernels), and
#   the 0.5B's step no longer depends on the context. The fast engine uses the kernel by default on CUDA.
#
# ## Exercises
#
# ````{exercise}
# :label: split-attention-merge
# If the merge cost as little as the parts, how long would the 0.5B's attention take per step at 16,384 tokens,
# and what would the whole step take, using the first run's step time and attention?
# ````
#
# ```{solution-start} split-attention-merge
# :class: dropdown
# ```

# %%
run = first[(first["size"] == "0.5B") & (first.context == 16384)].iloc[0]
step_us = figures.kernels(
    run
).end_us.max()  # the replay's span, as the new runs are timed
print(
    f"attention {2 * kernel:.0f} µs instead of {before:.0f}; "
    f"step about {step_us - before + 2 * kernel:.0f} µs instead of {step_us:.0f}"
)
predicted = step_us - before + 2 * kernel
small_05 = steps[steps["size"] == "0.5B"].set_index("context")
print(
    "measured with the merge kernel: "
    + ", ".join(f"{c:,} tokens {small_05.split[c] * 1e3:.0f} µs" for c in (8192, 30000))
)
assert small_05.split[8192] * 1e3 < predicted < small_05.split[30000] * 1e3

# %% [markdown]
# The step would fall by about the 1.1 ms the matrix products spend beyond that, roughly halving it. The runs
# with the merge kernel did not measure 16,384 tokens, but the contexts on either side of it, printed above,
# bracket the prediction.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: split-attention-parts
# Run the kernel in the interpreter with a single part (`split_len` at least the cache length) and with parts of
# one block each. Are the results equal bit for bit? Why, or why not?
# ````
#
# ```{solution-start} split-attention-parts
# :class: dropdown
# ```

# %% tags=["nbval-ignore-output"]
one = split_attention(q, keys, values, visible, 1 / 8, split_len=1024)
many = split_attention(q, keys, values, visible, 1 / 8, split_len=64)
print(f"largest difference: {(one - many).abs().max().item():.1e}")

# %% [markdown]
# They agree to float32 rounding but not bit for bit: the sums are added in a different order and rescaled at
# different points, and floating-point addition is not associative. Both are as close to the float64 result.
#
# ```{solution-end}
# ```
