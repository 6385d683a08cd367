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
# # Prefill: a whole prompt at once
#
# Decode reads every weight to make one token; prefill reads them once for the whole prompt. At 2,048 tokens the
# weights are no longer the limit: the matrix products are. This page counts the work a prefill must do, then
# takes the fast engine's prefill from below HF's speed in three measured steps: key and value heads shared
# instead of copied, the work around attention compiled, and the whole prefill captured as one CUDA graph. The 7B
# ends at 79% of the GPU's limit, the 0.5B at 40%. A fourth change, cutting a long prompt into chunks, is for
# memory, and is measured for what it costs.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - why a prefill is bound by arithmetic while decode is bound by bytes, and how far each model is from its bound;
# - how grouped-query attention runs without copying the cache, and how a later chunk's attention splits into
#   two easy ones that merge exactly;
# - how chunked prefill fills the same cache as one pass, checked here against the eager model;
# - what each step bought on an H200, where the time still goes, and what chunks cost at 30,000 tokens.
#
# **You need** the fast engine of {doc}`02_graphs`, grouped-query attention ({doc}`../ch3/03_gqa`)
# and the profile of {doc}`01_decode_profile`. No GPU: the checks run on the CPU, and the H200 measurements are
# committed data (about a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import prefill as figures
from helpers import BOOK, model_path, show_source, stamp

import torch

import minqwen
from minqwen.engine import fast as fast_engine
from minqwen.engine.fast import FastQwen2, prefill_attention
from minqwen.engine.request import prepare
from minqwen.model.sizes import prefill_flops, weight_bytes_per_step

RUNS = sorted(
    (BOOK / "data" / "profile").glob("prefill-*-nvidia-h200-2026-11-30.jsonl")
)
headers, runs = figures.load(RUNS)
print(stamp())

# %% [markdown]
# ## The bound: arithmetic, not bytes
#
# A prompt of $N$ tokens through a model with $P$ weights in its layers (every parameter a token passes through,
# except the embedding and the head) costs $2PN$ floating-point operations there, a multiply and an add per
# weight per token. Causal attention adds: in each of $L$ layers and $H$ query heads of width $d$, query $i$
# (counting from 1) meets $i$ keys in $q k^\top$ and again in the weighted sum of values,
#
# $$
# F(N) = 2PN + 4 L H d \,\frac{N (N + 1)}{2} + 2 V D,
# $$
#
# the last term being the head, once, for the last token's logits ($V$ words, hidden size $D$).
# `prefill_flops` is that sum:

# %%
show_source(prefill_flops)

# %% [markdown]
# Time is at least $F(N)$ over the card's matrix-product rate, and at least the weights' bytes over its
# bandwidth. With the rates measured on the H200 in the same runs as the prefills below (a large bf16 matrix
# product, and a large copy), the first is the larger from about 200 tokens on (the first exercise):

# %%
for size in ("0.5B", "7B"):
    rate, bandwidth = (
        headers[size]["matmul_flops_per_s"],
        headers[size]["copy_bytes_per_s"],
    )
    compute_ms = prefill_flops(size, 1, 2048) / rate * 1e3
    bytes_ms = weight_bytes_per_step(size, "bfloat16") / bandwidth * 1e3
    print(
        f"{size}, 2,048 tokens: arithmetic {compute_ms:.2f} ms, weight bytes {bytes_ms:.2f} ms "
        f"-> at most {2048 / compute_ms * 1e3:,.0f} tok/s"
    )
    assert compute_ms > 5 * bytes_ms
    print(
        f"   (its run measured {rate / 1e12:.0f} TFLOP/s and {bandwidth / 1e9:,.0f} GB/s)"
    )

# %% [markdown]
# A 7B prefill may not beat about 55,000 tokens a second on this card, a 0.5B one 950,000. Decode is the mirror
# image: one token per pass over the weights, bound by bytes ({doc}`01_decode_profile`).
#
# ## Key and value heads shared, not copied
#
# The eager model's `attend` ({doc}`../ch3/03_gqa`) copies each key and value head once per query head that
# uses it, then calls PyTorch's fused attention. For a prompt that copy is a full pass over the prompt's keys
# and values, written `groups` times. `scaled_dot_product_attention(..., enable_gqa=True)` lets the kernel map
# each query head to its key-value head instead.
#
# The engine prefills a long prompt in chunks (next section), so the queries of a chunk that starts at position
# $s$ meet the keys of every earlier position as well as their own. Query $i$ of the chunk sits at position
# $s + i$ and may see keys $0 \dots s + i$: of the chunk's $n \times (s + n)$ scores, the visible ones form a full
# block and then a triangle in the bottom-right corner. `is_causal=True` puts the triangle at the top left, which
# is right only when $s = 0$. PyTorch can be told the triangle is at the bottom right (`causal_lower_right`), but it
# then runs FlashAttention-2 (the open-source fused attention kernel), which on the H200 took twice as long as the
# kernel SDPA picks for a square triangle (18.7 against 9.5 ms for one 7B layer at 30,000 tokens, in the probe
# recorded in `book/data/bench/NOTES.md`). So the engine splits the chunk's keys in two, each the easy case:
#
# - its own $n$ keys: a square causal triangle;
# - the $s$ earlier keys: every query sees all of them, no mask at all. The `groups` query heads that share a kv
#   head can then be stacked as $\text{groups} \times n$ rows of one head, so even the kv-head sharing needs
#   nothing from the kernel.
#
# Write $z_j = q \cdot k_j / \sqrt{d}$ for a query row's scaled scores. Each part's kernel also returns, for every
# query row, the log-sum-exp of its scores, $\lambda_p = \log \sum_{j \in p} e^{z_j}$, the logarithm of the
# softmax's denominator over that part. That is all the merge needs. Part $p$'s output is
# $o_p = \sum_{j \in p} e^{z_j} v_j / e^{\lambda_p}$, so $e^{\lambda_p} o_p = \sum_{j \in p} e^{z_j} v_j$: summing
# that over the parts and dividing by the sum of all the exponentials gives the whole row's attention,
#
# $$
# o = \sum_p \frac{e^{\lambda_p}}{\sum_r e^{\lambda_r}}\, o_p ,
# $$
#
# a softmax over the parts' $\lambda$. It is the identity behind split attention in
# {doc}`03_split_attention`, with the maxima and sums folded into one number per part. On CUDA both parts run
# in cuDNN's attention kernel (NVIDIA's library of fused deep-learning kernels), on the CPU in PyTorch's own
# fused kernel. Three cases keep the single call: a left-padded batch, whose mask is passed as it is, and GPUs
# older than the A100 or float32 inputs, where cuDNN's kernel does not run; there `causal_lower_right` stays.

# %%
show_source(prefill_attention)
show_source(fast_engine.merge_attention)

# %% [markdown]
# Against float64 attention with the kv heads repeated and the mask written out, for a chunk of 5 queries that
# starts at position 12. `prefill_attention` needs no start: the chunk's own keys are the last 5 of the 17 it is
# given, and `mask=None` means "no padding":

# %%
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 14, 5, 64, generator=g)
keys, values = (
    torch.randn(1, 2, 17, 64, generator=g),
    torch.randn(1, 2, 17, 64, generator=g),
)
visible = torch.arange(17)[None, :] <= torch.arange(12, 17)[:, None]
scores = q.double() @ keys.double().repeat_interleave(7, 1).transpose(-1, -2) / 8
exact = scores.masked_fill(~visible, float("-inf")).softmax(
    -1
) @ values.double().repeat_interleave(7, 1)
error = (prefill_attention(q, keys, values, None) - exact).abs().max().item()
print(f"largest difference from float64: {error:.1e}")
assert error < 1e-5

# %% [markdown]
# ## Chunks: bounded memory for any prompt
#
# Everything a prefill holds besides the cache grows with the prompt: the hidden states, the fused q/k/v, and
# above all the MLP's gate and up projections, $N \times 2I$ values ($I$ is 18,944 at 7B, so 2.1 GiB in bf16 at
# 30,000 tokens). Cutting the prompt into chunks and running each through every layer before the next bounds
# all of it by the chunk. Each chunk writes its keys and values into the cache and reads everything before it
# from there:

# %%
show_source(FastQwen2._prefill_chunks)
show_source(FastQwen2._prefill_span)
show_source(FastQwen2._prefill_layer)

# %% [markdown]
# The cache a chunked prefill leaves must be the one a single pass leaves. With the book's model in float32, a
# 45-token prompt in chunks of 16 against the eager model's cache, every layer:

# %%
model = minqwen.Qwen2.from_pretrained(model_path())
prompt = torch.randint(0, 1000, (1, 45), generator=torch.Generator().manual_seed(3))
greedy = dict(do_sample=False, eos_token_id=[])
fast = FastQwen2(model, bucket=64, prefill_chunk=16)
state = fast._start(prepare(model.config, prompt, 1, **greedy))
cache = model.new_cache()
model(prompt, cache=cache)
differences = [
    max(
        (state.keys[i][:, :, :45] - cache.keys[i]).abs().max().item(),
        (state.values[i][:, :, :45] - cache.values[i]).abs().max().item(),
    )
    for i in range(model.config.num_hidden_layers)
]
print(f"largest difference over {len(differences)} layers: {max(differences):.1e}")
assert max(differences) < 1e-4
tokens = fast.generate(prompt, 8, **greedy)
assert torch.equal(tokens, minqwen.generate(model, prompt, 8, **greedy))
print("and the 8 greedy tokens that follow are the eager loop's")

# %% [markdown]
# The differences are float32 rounding: a chunk's attention adds its terms in another order than one pass does,
# in two parts merged at the end. `tests/test_ch5_prefill.py` checks chunks of 1, 4, 7, 16, 37 and 64 tokens on a
# 37-token prompt, and of 3, 8 and 64 on a left-padded batch; it fails if the merge weighs the parts wrongly.
#
# ## One graph for the whole prefill
#
# On a GPU the engine compiles the work before and after attention (the norms, RoPE, SwiGLU and residual adds
# fuse into a few kernels around the matrix products), and captures a prompt that fits in one chunk as a single
# CUDA graph, as it does for a decode step ({doc}`02_graphs`). A graph has fixed shapes, so the
# prompt is padded on the right up to the graph's length: causal attention hides the padding from every real
# token, the padding's keys land in cache slots that decode overwrites before it can see them, and the logits are
# read at the last real token. (A batch whose prompts differ in length also arrives left-padded,
# {doc}`../ch4/03_batching`, and needs a mask: each length has a graph with a mask and one without.) The right
# padding is computed like real tokens, so from 128 tokens on it is kept under a quarter of the prompt, with four
# graph lengths per doubling of the prompt. (The engine first padded to its whole 256-position cache bucket, which
# doubled a 128-token prompt's work; {doc}`06_scorecard` shows what that cost at large batches.)

# %%
show_source(fast_engine.prefill_length)

# %% [markdown]
# The capture, once per padded length, through the same `capture` the decode step's graph goes through
# ({doc}`02_graphs`):

# %%
show_source(fast_engine._PrefillGraph.__init__)

# %% [markdown]
# and each prompt afterwards, copied into the graph's buffers and the last real position set, then one replay:

# %%
show_source(fast_engine._PrefillGraph.run)

# %% [markdown]
# ## Measured on an H200
#
# `scripts/gpu_prefill.py` timed each step in one run per model (bf16, random weights with the real configs,
# batch 1, a 2,048-token prompt, the median of ten `generate(ids, 1)` calls, as `python -m minqwen bench` counts
# prefill). Each bar adds one change to the one before; the grey bar is transformers' own `generate`, run in the
# same process:

# %% tags=["hide-input"]
prefills = runs[runs.kind == "prefill"]
figures.steps(prefills)

# %%
share = prefills.set_index(["size", "variant"])
graph_7b = share.loc[("7B", "graph")]
of_bound = graph_7b.tok_s / graph_7b.flop_bound_tok_s
over_hf = share.loc[("0.5B", "graph")].tok_s / share.loc[("0.5B", "hf-eager")].tok_s
print(f"0.5B: {over_hf:.1f}x HF eager; 7B: {of_bound:.0%} of the FLOP bound")
assert over_hf > 3

# %% [markdown]
# Sharing the kv heads bought 2% at both sizes (the copies were a small part of the work); compiling and the
# graph bought the rest. The two models were limited by different things, and the profile of one prefill says
# which: every kernel of a `generate(ids, 1)` call, summed by class, and as "idle" the time between the first
# kernel's start and the last one's end when no kernel ran. The profiler itself slows the host, so the idle
# time is larger than in the timed calls: the 0.5B graph's profiled span is 7.1 ms, its timed call 5.4 ms.

# %% tags=["hide-input"]
split = figures.time_split(runs[runs.kind == "profile"])
figures.where_time_goes(split)

# %% tags=["remove-input", "hide-output"]
split.round(2)

# %% [markdown]
# - **0.5B: the host.** Its whole prefill is 4.3 ms of kernels, about 10 µs of GPU work each, but Python spent
#   about 60 µs issuing each of its 435 kernels (under the profiler), so the GPU sat idle most of the time.
#   Compiled, the same launches remain, and the rates of the uncompiled and compiled steps swing with the host's
#   speed: the compiled one ran at 101,000 tokens a second here, and at 99,000 and 179,000 in two earlier runs.
#   The graph removed the launches, and only then did the prefill reach 378,000 tokens a second, 40% of the FLOP
#   bound. What is left is the size of the work itself:
#   a $2048 \times 896$ by $896 \times 896$ product cannot keep the H200's 132 multiprocessors (its independent
#   compute units) busy for long. HF eager's rate swings between runs as the uncompiled steps' does, which points
#   to the host as well (not profiled): 83,000 tokens a second here, 76,000 and 97,000 in the earlier runs.
# - **7B: the matrix products.** 35.7 ms of the 41 ms of kernels are cuBLAS (NVIDIA's matrix-product library)
#   products running at about 750 TFLOP/s, as fast as the large square product the bound is measured with: they
#   are at the bound. Then come attention (2.2 ms) and the compiled pointwise kernels (2.8 ms), which run between
#   the products and add to the time. The graph gains little here (43,400 against 42,900 tokens a second, within
#   run-to-run noise), and the engine reaches 74–79% of the FLOP bound across three runs, against the target of
#   80% set for this chapter. About 6 ms of the 47 ms call run no kernel at all: 2.7 ms of gaps inside the
#   profiled span and 3.5 ms before or after it. Closing the gap means finding that time, and folding the
#   pointwise work into the matrix products' epilogues (the last step of a matrix-product kernel, which can
#   apply a bias or an activation to the output before writing it). Neither is done yet.
#
# ## Chunks at 30,000 tokens: memory against speed
#
# The same run prefilled a 30,000-token prompt in chunks of several sizes (a chunk of 30,000 is the whole prompt,
# captured as one graph), and HF eager did the whole prompt in one pass. The peak is the memory allocated above
# the weights during the call, the engine's KV cache included:

# %% tags=["hide-input"]
long = runs[runs.kind == "long"]
figures.long_prompt(long)

# %%
seven = long[long["size"] == "7B"].set_index(["impl", "chunk"], drop=False)
chunked, whole = seven.loc[("minqwen", 2048.0)], seven.loc[("minqwen", 30000.0)]
for name, row in (("7B, chunks of 2,048", chunked), ("whole prompt", whole)):
    print(
        f"{name}: {row.peak_above_bytes / 2**30:.1f} GiB above the weights, "
        f"{row.tok_s:,.0f} tok/s, {row.attention_us / 1e3:,.0f} ms of attention, "
        f"{row.other_us / 1e3:,.0f} ms of other kernels"
    )
assert chunked.peak_above_bytes < whole.peak_above_bytes / 2
assert chunked.attention_us < 1.1 * whole.attention_us

# %% [markdown]
# Chunks of 2,048 cut the 7B's peak from 6.0 to 2.0 GiB, of which 1.6 GiB is the cache itself, for 9% of the
# speed. Their attention takes as long as the whole prompt's, because both parts run in the cuDNN kernel SDPA
# picks for a square triangle. The first version of this page sent each chunk's bottom-right triangle through
# `causal_lower_right`, which runs FlashAttention-2: 672 ms of attention instead of 350, and 24% of the speed lost
# (`book/data/bench/NOTES.md`). What chunks still cost at 7B is the merge, a few unfused kernels per layer (the
# "other" 82 ms). At 0.5B chunks cost far more, for the reason of the last section: each chunk is launched from
# Python: at the default chunk of 2,048 the 0.5B prefills 30,000 tokens at 106,000 a second, against 188,000 for HF
# eager and 225,000 for its own whole-prompt graph. The engine keeps chunks of 2,048 by default (a prompt that fits
# runs as one graph), and `FastQwen2(model, prefill_chunk=...)` trades memory for speed.
#
# ## Summary
#
# - A prefill's bound is arithmetic, $F(N) = 2PN + 2LHdN(N+1) + 2VD$, over the card's matrix rate; at 2,048
#   tokens on an H200 that is about 55,000 tok/s at 7B and 950,000 at 0.5B.
# - `enable_gqa` shares the key-value heads inside the attention kernel. A later chunk's attention is two easy
#   ones, its own square triangle and the earlier keys unmasked, merged by a softmax over their log-sum-exps.
# - Chunked prefill fills the same cache as one pass (checked in float32 against the eager model), and bounds
#   the activations by the chunk: 2.0 GiB instead of 6.0 at 7B and 30,000 tokens, for 9% of the speed.
# - A small model's prefill is bound by launches: one CUDA graph took the 0.5B from about HF's speed to 4.5
#   times it in the same run. A large one is bound by its matrix products: the 7B reaches 74–79% of the FLOP
#   bound, the rest being attention and pointwise kernels.
#
# ## Exercises
#
# ````{exercise}
# :label: prefill-crossover
# From what prompt length is a 7B prefill on this H200 bound by arithmetic rather than by reading the weights?
# Use the rates measured in the run.
# ````
#
# ```{solution-start} prefill-crossover
# :class: dropdown
# ```

# %%
run = headers["7B"]
rate, bandwidth = run["matmul_flops_per_s"], run["copy_bytes_per_s"]
weights_s = weight_bytes_per_step("7B", "bfloat16") / bandwidth
crossover = next(
    n for n in range(1, 4096) if prefill_flops("7B", 1, n) / rate > weights_s
)
print(
    f"from {crossover} tokens on, arithmetic takes longer than reading the weights",
    end="",
)
print(f" ({weights_s * 1e3:.2f} ms)")

# %% [markdown]
# About 200 tokens. The card does about 180 operations in the time it reads one byte, and a prefill does one
# operation per weight byte per token (two per bf16 weight), which alone gives about 180 tokens. The head moves
# the answer up: its weights are read on every pass but used for one token only, so there are more bytes to
# read per token's worth of work. Below that length, a prefill costs about what one decode step costs.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: prefill-right-padding
# The captured prefill right-pads the prompt. Show on the book's model that padding tokens appended to a prompt
# change neither the logits nor the keys and values of the real tokens.
# ````
#
# ```{solution-start} prefill-right-padding
# :class: dropdown
# ```

# %%
padded = torch.cat([prompt, torch.zeros(1, 19, dtype=torch.long)], dim=1)
plain_cache, padded_cache = model.new_cache(), model.new_cache()
plain_logits = model(prompt, cache=plain_cache)
padded_logits = model(padded, cache=padded_cache)[:, :45]
logit_error = (plain_logits - padded_logits).abs().max().item()
key_error = max(
    (a - b[:, :, :45]).abs().max().item()
    for a, b in zip(plain_cache.keys, padded_cache.keys)
)
print(f"logits differ by at most {logit_error:.1e}, keys by {key_error:.1e}")
assert logit_error < 1e-4 and key_error < 1e-4

# %% [markdown]
# Causal attention never lets a position see a later one, so what follows the prompt cannot reach it; the
# differences are rounding, from the longer rows of the attention kernel.
#
# ```{solution-end}
# ```
