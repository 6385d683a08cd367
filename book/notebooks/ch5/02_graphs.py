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
# # Static shapes and CUDA graphs
#
# The profile of {doc}`01_decode_profile` showed a 0.5B decode step as some 300 kernels, most of them a few
# microseconds of work each. The eager loop of chapter 4 launches each of those kernels from Python, one
# `torch` call at a time, and waits for the GPU at every token to read the chosen token back. This page builds
# the fast engine, `minqwen.engine.fast.FastQwen2`, in four moves that take that overhead away, and measures on
# an H200 what each move buys.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - a cost model for a decode step: the bytes it reads, plus a fixed cost for every kernel it runs;
# - why a {term}`CUDA graph` needs every step to have the same shapes, and how a static, bucketed
#   {term}`KV cache` and counters kept on the device give it that;
# - how one compiled layer serves every layer, and why a single row is best written as a multiply-and-sum;
# - what each move gains, measured side by side on an H200 for the 0.5B and the 7B, from transformers' eager
#   `generate` to the engine the rest of the book uses;
# - why the fast engine's tokens equal the eager loop's in float32, and part from them only at near-ties in bf16.
#
# **You need** the profile of {doc}`01_decode_profile`, the roofline of {doc}`../ch4/05_performance` and the cache
# of {doc}`../ch4/02_manual_cache`. No GPU: the H200 run is committed data, and the checks run here on the CPU
# (about a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import decode_profile
from figures import fast_engine as figures
from helpers import BENCH, BOOK, model_path, show_source, stamp, toy_checkpoint

import json

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minqwen
from minqwen.engine.fast import FastQwen2
from minqwen.engine.sampling import SamplingConfig, process_logits, sample_without_sync
from minqwen.model.sizes import weight_bytes_per_step
from minqwen.tools.stats import chi_square

WATERFALL = BOOK / "data" / "profile" / "waterfall-nvidia-h200-2026-12-01.jsonl"
PROFILE = (
    "decode-profile-nvidia-h200-2026-11-30.jsonl"  # the kernels of one step, page 01
)
header, *lines = (json.loads(line) for line in WATERFALL.read_text().splitlines())
waterfall = pd.DataFrame(lines)
beta = header["copy_bytes_per_s"]
print(stamp())

# %% [markdown]
# ## A step costs bytes plus kernels
#
# A decode step at batch 1 must read every weight once, $W$ bytes at the bandwidth $\beta$. It also runs $n$
# kernels, and each costs a fixed $\tau$ beyond its bytes: the launch, the ramp-up and tail of a kernel that
# fills the GPU for a few microseconds only, and, in an eager loop, the Python that issues it. So
#
# $$
# t_\text{step} \;\approx\; \frac{W}{\beta} + n\,\tau .
# $$
#
# The first term is the roofline and cannot shrink. Everything on this page works on the second: fewer kernels
# (smaller $n$), and a smaller cost for each (smaller $\tau$). How large is $n$ for the eager step? Count the
# operations one step dispatches, here on the CPU, with the book's own model. Each one that is not a view of an
# existing tensor would be one kernel on a GPU:


# %%
class CountKernels(TorchDispatchMode):
    """Counts the tensor operations that run a kernel: views and allocations only relabel memory."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__ not in (
            "empty.memory_format",
            "empty_like.default",
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


model = minqwen.Qwen2.from_pretrained(model_path())
prompt = torch.tensor([[9707, 11, 847, 829, 374]])


def kernels_of(generate) -> int:
    """Operations of one decode step: generating two tokens minus generating one."""
    counts = []
    for new_tokens in (1, 2):
        with CountKernels() as counter:
            generate(prompt, new_tokens, do_sample=False, eos_token_id=[])
        counts.append(counter.count)
    return counts[1] - counts[0]


eager_kernels = kernels_of(lambda *a, **k: minqwen.generate(model, *a, **k))
layers = model.config.num_hidden_layers
print(f"{eager_kernels} operations per step, {eager_kernels / layers:.0f} per layer")

# %% [markdown]
# Nearly a thousand operations for 24 layers. On a GPU each is a kernel launched from Python, at some 10 to 20 µs
# apiece once the interpreter's own work is counted, while the whole step's bytes take about 0.24 ms on an H200.
# The eager step is bound by Python, not by the GPU: the measurements below put it near 18 ms.
#
# ## Four moves
#
# `FastQwen2` wraps a loaded `Qwen2` without changing it:
#
# 1. **Fused projections.** q, k and v become one matrix, gate and up another: two products instead of five, and
#    the weights of each read in one pass.
# 2. **A static, bucketed cache.** The cache of a request is allocated once, for prompt plus new tokens rounded up
#    to a multiple of 256 positions, and every step writes its key and value in place at a slot held in a device
#    tensor. Attention reads the whole bucket, with a mask for the slots not yet written. Every step has the same
#    shapes, and any request whose total falls in the same bucket reuses them.
# 3. **No host sync per token.** The next token, its position and slot, the finished flags and the output buffer
#    live on the device, and the step updates them itself (`advance`). Nothing is read back to Python until the
#    end, except a check every 16 steps of whether every row has finished. That includes sampling:
#    `sample_without_sync` draws from the eager sampler's distribution with no data-dependent shapes.
# 4. **One compiled layer and one CUDA graph per step.** Every layer has the same code and shapes, so one
#    `torch.compile`d `decode_layer` serves all of them; the whole step (embedding, every layer, head, sampling,
#    `advance`) is then captured once as a CUDA graph and replayed once per token: one launch instead of hundreds.
#
# Moves 2 and 3 are what make move 4 possible: a graph replays fixed kernels on fixed memory, so every tensor a
# step touches must keep its shape and address from one token to the next. The engine's step gives every layer
# the same arguments; check it by recording the shapes `decode_layer` receives over a few steps, here without
# compiler or graphs:

# %%
fast = FastQwen2(model)
calls = []
eager_layer = fast._decode_layer


def recording_layer(*args):
    calls.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
    return eager_layer(*args)


fast._decode_layer = recording_layer
fast.generate(prompt, 6, do_sample=False)
fast._decode_layer = eager_layer
print(f"{len(calls)} layer calls, {len(set(calls))} distinct sets of argument shapes")
print("cache of one layer:", calls[0][5], "(batch, kv heads, positions, head dim)")
assert len(set(calls)) == 1 and calls[0][5][2] == fast.capacity_for(prompt.shape[1] + 6)

# %% [markdown]
# Five decode steps (the first of the six tokens comes from the prefill) through 24 layers, one set of shapes: the cache holds the whole 256-position bucket from the
# first token on. The eager loop's cache, by contrast, grows by one position a step.
#
# The layer itself is the model's math on plain tensors, so that one compiled function fits every layer.
# Grouped-query attention puts the query heads that share a kv head as rows of one matrix product, so each cached
# key and value is read once:

# %%
show_source(minqwen.engine.fast.decode_layer)

# %% [markdown]
# A projection of one row is a matrix-vector product, pure weight reading. Written as multiply-and-sum, the
# compiler turns it into one reduction kernel that also absorbs the pointwise work around it (the norm's scale,
# the bias, SwiGLU, the residual add), where a library matrix product would be a kernel of its own, with the
# pointwise work in more kernels beside it:

# %%
show_source(minqwen.engine.fast.linear)

# %% [markdown]
# The capture runs the step twice first on a side stream (a second queue of GPU work, away from the one being
# recorded), so that compilation and the kernels' choice of configuration happen outside the graph, then records
# it:

# %%
show_source(minqwen.engine.fast.capture)

# %% [markdown]
# ## What each move buys, on an H200
#
# One run on an H200 measured each step of the way side by side (`scripts/gpu_waterfall.py`): bf16, random
# weights with the real configs, batch 1, a 128-token prompt and 128 new tokens, decode tok/s by the benchmark's
# own method ({doc}`../ch4/05_performance`). Each bar adds one thing to the one before it:
#
# | bar | what it adds |
# |---|---|
# | `hf-eager` | transformers' `generate`, its dynamic cache |
# | `minqwen-eager` | the book's loop and cache (chapter 4) |
# | `static-cache` | moves 1 to 3: fused projections, the static cache, counters on the device; still uncompiled |
# | `compiled` | the step compiled, projections as library matrix products; still called from Python |
# | `graphs` | the compiled step captured and replayed as one CUDA graph |
# | `reductions` | single-row projections as compiled multiply-and-sum reductions |
# | `split-attention` | attention by the split kernel of {doc}`03_split_attention` (the default above one row; {doc}`05_fused_kernels` goes further at one) |
#
# Grey bars are the eager loops, red ones the fast engine's steps; each is labelled with its rate and its gain
# over the bar above. The dashed line is transformers' own fast path, a static cache and `torch.compile`
# (`hf-static-compile`), the solid one the roofline:

# %% tags=["hide-input"]
VARIANTS = figures.STEPS[: figures.STEPS.index("split-attention") + 1]
tok_s = waterfall.pivot(index="variant", columns="size", values="decode_tok_s")
rooflines = waterfall.groupby("size").roofline_decode_tok_s.first()
figures.waterfall(
    tok_s, rooflines, VARIANTS, f"Batch-1 decode, {header['hardware']['gpu']}, bf16"
)

# %% tags=["hide-input"]
step_ms = 1e3 / tok_s
table = pd.DataFrame(
    {
        f"{size} {column}": values
        for size in ("0.5B", "7B")
        for column, values in (
            ("tok/s", tok_s[size]),
            ("ms per step", step_ms[size]),
            ("of the roofline", tok_s[size] / rooflines[size]),
        )
    }
).loc[VARIANTS + ["hf-static-compile"]]
table.style.set_uuid("graphs-waterfall").format(
    "{:,.3f}", subset=[c for c in table if "ms" in c]
).format("{:.0%}", subset=[c for c in table if "roofline" in c]).format(
    "{:,.1f}", subset=[c for c in table if "tok/s" in c]
)

# %% [markdown]
# Read the bars as the cost model's two terms.
#
# - **Moves 1 to 3 alone buy nothing.** The uncompiled fast step is no faster than the eager loop, a little slower
#   even: it issues about as many operations from Python, and its attention reads the whole 256-position bucket.
#   Fixed shapes are not a speed-up in themselves; they are what compilation and capture need.
# - **Compiling** fuses the pointwise operations into few kernels (smaller $n$), two to three times faster. Called
#   from Python, the compiled step still pays, at every layer's call, for its guards (the checks that the
#   compiled code still fits its inputs) and for launching its kernels one by one.
# - **The graph** removes Python from the step altogether: almost nine times the compiled step's speed for the
#   0.5B, whose kernels are the smallest and whose step was almost all $n\tau$; 1.7 times for the 7B, whose
#   kernels have more bytes to read.
# - **Reductions and split attention** make the 0.5B faster again and leave the 7B where it was (within the
#   run's noise): at a 256-token context attention is a small part of the step. At 30,000 tokens split attention
#   takes the 7B from 31% of its roofline to between 70% and 81%, depending on how the compiler tuned the weight
#   kernels of each build ({doc}`03_split_attention`).
#
# The eager step's $\tau$ follows from the count above and the measured step: all of it but the bytes, shared
# among its kernels. For the graph, the kernel count is the profiler's, from {doc}`01_decode_profile`:

# %%
_, profiled = decode_profile.load(BOOK / "data" / "profile" / PROFILE)
replay = profiled.query("size == '0.5B' and context == 256").iloc[0]
W = weight_bytes_per_step("0.5B")
for variant, kernels in (
    ("minqwen-eager", eager_kernels),
    ("graphs", len(replay.kernels)),
):
    fixed_ms = step_ms.loc[variant, "0.5B"] - W / beta * 1e3
    print(
        f"0.5B {variant}: {step_ms.loc[variant, '0.5B']:.3f} ms a step, "
        f"{fixed_ms / kernels * 1e3:.1f} µs beyond the bytes for each of {kernels} kernels"
    )

# %% [markdown]
# About 19 µs an operation from Python, against under 3 µs a kernel inside a graph (the count of 300 is from the
# profile of an earlier build of the same step): the compiler cut the count by a factor of three, and the graph
# made each one six to seven times cheaper. What it cannot do is make a kernel free, and the 0.5B's step is still several times its
# roofline. That is the subject of the rest of this chapter.

# %%
assert (tok_s.loc["split-attention"] > tok_s.loc["hf-static-compile"]).all()
assert (tok_s.loc["graphs"] > 1.5 * tok_s.loc["compiled"]).all()

# %% [markdown]
# The two checks above hold on the committed run: the engine beats transformers' compiled path on both sizes,
# and the graph makes the compiled step at least half as fast again.
#
# ## Same tokens as the eager loop?
#
# In float32 on a CPU the fast engine must pick exactly the greedy tokens of `minqwen.generate`, and the same
# sampled tokens for the same seed: without graphs it calls the eager loop's own sampler. A toy Qwen2 (the
# 0.5B's widths, two layers, a vocabulary of 8,192, random weights) keeps it quick:

# %%
toy_folder = toy_checkpoint()

# %%
toy = minqwen.Qwen2.from_pretrained(toy_folder)
prompts = torch.randint(3, 8192, (2, 20), generator=torch.Generator().manual_seed(1))
fast_toy = FastQwen2(toy)
for settings in (dict(do_sample=False), dict(do_sample=True, top_k=0, seed=0)):
    eager_tokens = minqwen.generate(toy, prompts, 24, eos_token_id=[], **settings)
    fast_tokens = fast_toy.generate(prompts, 24, eos_token_id=[], **settings)
    assert torch.equal(fast_tokens, eager_tokens)
    print(f"{settings}: fast == eager on all 24 new tokens of both rows")

# %% [markdown]
# On a GPU, in bf16, the compiled kernels sum in another order than the eager ones, and a flip can follow wherever
# two tokens' logits are within rounding of each other. The committed check ran three chat prompts for 32 tokens
# on an H100, with random weights of the real configs. For each row: how many tokens were equal before the first
# difference, and at that step the gap between the two tokens' logits in the eager model:

# %% tags=["hide-input"]
agreement = pd.DataFrame(
    json.loads(line)
    for line in (BENCH / "fast-agreement-nvidia-h100-80gb-hbm3-2026-11-26.jsonl")
    .read_text()
    .splitlines()
)
agreement["equal before the first difference"] = agreement["same"].astype(str) + " / 32"
agreement[
    ["size", "dtype", "row", "equal before the first difference", "gap", "gap_ulps"]
].rename(columns={"gap": "logit gap", "gap_ulps": "gap in bf16 steps"})

# %% [markdown]
# In float32 the two paths agree on every token; in bf16 they part only where the eager model's own logits put the
# two choices 0 to 6 rounding steps apart (0 is an exact bf16 tie). Random weights make flat logits, so such
# near-ties come early.

# %%
fp32 = agreement[agreement.dtype == "float32"]
assert len(fp32) and (fp32.same == 32).all()
assert (agreement[agreement.same < 32].gap_ulps.abs() <= 8).all()

# %% [markdown]
# ## Summary
#
# - A decode step costs its bytes plus a fixed cost per kernel, $t \approx W/\beta + n\tau$; the eager loop's
#   hundreds of operations, each issued from Python, make $n\tau$ most of a step.
# - A CUDA graph replays a whole step as one launch, but only a step whose shapes and addresses never change: a
#   static, bucketed cache, counters on the device and sampling without a sync provide that.
# - One compiled layer serves every layer, and a single row written as multiply-and-sum lets the compiler fuse
#   each projection with the pointwise work around it.
# - Measured on an H200, the graph is the largest single step for small models; together the moves take the 0.5B
#   from tens of tok/s to over a thousand, ahead of transformers' compiled path, yet still far from its roofline.
# - The engine's tokens equal the eager loop's in float32; in bf16 they part only at near-ties.
#
# ## Exercises
#
# ````{exercise}
# :label: graphs-buckets
# A request's cache is rounded up to a multiple of `bucket` positions, and each (batch, bucket) gets its own graph.
# For prompts of 1 to 4,000 tokens and 256 new tokens, how many distinct graphs does the default bucket of 256
# need, and what share of the cache's positions is wasted on average? Compare buckets of 64 and 1,024.
# ````
#
# ```{solution-start} graphs-buckets
# :class: dropdown
# ```

# %%
totals = torch.arange(1, 4001) + 256
for bucket in (64, 256, 1024):
    capacity = (totals + bucket - 1) // bucket * bucket
    waste = (1 - totals / capacity).mean()
    print(
        f"bucket {bucket:5}: {capacity.unique().numel():3} graphs, "
        f"{waste:.1%} of positions unused on average"
    )
assert FastQwen2(toy, bucket=256).capacity_for(300) == 512

# %% [markdown]
# Small buckets waste little memory and attention work but need many graphs, each captured once (seconds) and
# each holding its own buffers; large buckets need few graphs but make short requests read a long, mostly empty
# cache. 256 keeps the waste under 8% with 16 graphs for these lengths, and the engine keeps only the
# `MAX_STATES` most recently used states.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: graphs-sampler
# The fast engine draws with `sample_without_sync`, an exponential race instead of `torch.multinomial`: other
# draws, the same distribution. Check it: draw 20,000 tokens with it from one row of logits under the Instruct
# defaults (temperature 0.7, top-k 20, top-p 0.8), and test the counts against the probabilities of
# `process_logits` with `minqwen.tools.stats.chi_square`.
# ````
#
# ```{solution-start} graphs-sampler
# :class: dropdown
# ```

# %%
torch.manual_seed(0)
logits = torch.randn(1, 1000)
config = SamplingConfig.resolve(
    {}, do_sample=True, temperature=0.7, top_k=20, top_p=0.8
)
seen = torch.zeros(1, 1000, dtype=torch.bool)
probs = process_logits(logits, None, config, seen=seen).softmax(-1)[0]
draws = sample_without_sync(logits.expand(20_000, -1), seen.expand(20_000, -1), config)
counts = torch.bincount(draws, minlength=1000)
statistic, dof, p = chi_square(counts, probs)
print(f"{int((probs > 0).sum())} tokens survive the filters")
print(f"chi-square {statistic:.1f} on {dof} degrees of freedom, p = {p:.2f}")
assert p > 0.01 and counts[probs == 0].sum() == 0

# %% [markdown]
# No draw falls outside the filtered set, and the counts fit the distribution (a p-value far below 0.01 would mean
# they did not). The race picks token $i$ with probability $p_i$ because $\arg\max_i p_i / E_i$ with independent
# $E_i \sim \mathrm{Exp}(1)$ is $\arg\min_i E_i / p_i$, and $E_i / p_i$ is an exponential of rate $p_i$: the
# smallest of independent exponentials is the one of rate $p_i$ with probability $p_i / \sum_j p_j$.
#
# ```{solution-end}
# ```
