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
# # Weights in 4 bits
#
# {doc}`The previous page <02_int8_weights>` halved the bytes of a bfloat16 model and lost nothing measurable.
# Four bits halve them again, but sixteen levels are coarse: one scale per row no longer works, and the choice of
# how many weights share a scale becomes a trade of bits against accuracy. This page builds group-wise int4, runs
# it on PyTorch's own packed int4 kernels, measures what it costs on real text for both book models, and what it
# buys on this CPU and on an H200.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - why 4 bits need a step and an offset per group of weights, not per row, with the formula and its error bound;
# - how the int4 kernels want their weights: a zero point, two values to a byte, a layout of their own, and how
#   the kernel itself reads the values back;
# - the trade-off of bits per weight against perplexity on the real 0.5B and 1.5B models, with the GGUF file's own
#   mix on the same axes, and what a grid fitted to the weights (torchao's HQQ) buys over a min/max one;
# - what 4 bits buy in decoding speed on a CPU and on an H200, beside torchao, the reference library;
# - how to quantize while loading, so that the float model is never in memory whole.
#
# **You need** per-channel int8 from {doc}`02_int8_weights` and the block formats of {doc}`01_gguf_blocks`.
# Running it takes the embedded model (about two minutes); the 1.5B model's numbers and the GPU's are committed
# data.
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import int4_weights as figures
from helpers import BOOK, MODEL_SOURCE, model_path, show_source, stamp, tokenizer

import copy
import importlib.util
import inspect
import math
import textwrap

import pandas as pd
import torch
from gguf import GGUFReader

import minqwen
from minqwen.engine.fast import FastQwen2
from minqwen.quant import int4, weight_only
from minqwen.tools import bench
from minqwen.weights import EMBEDDED, cache_dir

QUANT = BOOK / "data" / "quant"
model = minqwen.Qwen2.from_pretrained(model_path())
tok = tokenizer()
print(stamp())

# %% [markdown]
# ## Why groups
#
# With 16 levels, one scale per row puts the step at a fifteenth of the row's range: a single large weight
# coarsens every other weight of the row. So int4 cuts each row into groups of $g$ consecutive input weights and
# gives each group its own step $s$ and minimum $m$. The grid is asymmetric, from the group's own minimum to its
# own maximum, which spends all sixteen levels on values the group actually has:
#
# $$
# s = \frac{\max_i w_i - \min_i w_i}{15}, \qquad q_i = \operatorname{round}\!\left(\frac{w_i - m}{s}\right)
# \in [0, 15], \qquad |m + s\,q_i - w_i| \le \frac{s}{2}.
# $$
#
# The bound holds on this float32 grid. The layer keeps each group's two numbers in bfloat16 (the next section
# says why), which moves a level by a little more. A group of $g$ weights then stores $4g$ bits of values and two
# 16-bit numbers: $4 + 32/g$ bits per weight, 4.25 at $g = 128$ and 5 at $g = 32$.

# %%
show_source(int4.quantize_groupwise)

# %% [markdown]
# On the first layer's gate projection every weight lands within half a step of its level, and the error falls as
# the groups shrink; one scale per row (the red bar) is several times worse:

# %%
weight = model.layers[0].mlp.gate_proj.weight.detach()
rms = {}
for g in (weight.shape[1], 128, 64, 32):
    values, steps, minimums = int4.quantize_groupwise(weight, g)
    grid = minimums[..., None] + steps[..., None] * values.float().reshape(
        *steps.shape, g
    )
    error = grid.reshape(weight.shape) - weight
    assert (error.abs() <= steps.repeat_interleave(g, dim=1) / 2 + 1e-6).all()
    rms["per row" if g == weight.shape[1] else f"g = {g}"] = (
        error.square().mean().sqrt().item()
    )
figures.error_by_group_size(list(rms), list(rms.values()))

# %% [markdown]
# ## The kernels' form
#
# PyTorch ships int4 matrix products for both devices: `_weight_int4pack_mm` on CUDA, from tinygemm (a library of
# matrix kernels for one or a few rows of input), and its CPU twin `_weight_int4pack_mm_for_cpu`. They are what
# torchao and gpt-fast build on. They read each 4-bit value as a signed number $q - 8$ in $-8 \dots 7$, and take
# the same grid written with $z = m + 8s$, the real value of level 8, which they call the zero point (elsewhere a
# zero point is often an integer level):
#
# $$ w \approx (q - 8)\,s + z, $$
#
# the steps and zero points as one bfloat16 tensor, and the values two to a byte in a tiled layout of their own,
# different for each device. `Int4Linear` packs its weight for the device it is quantized on, and runs every
# product in bfloat16, the only type in which both kernels are fast:

# %%
show_source(int4.Int4Weight.matmul)

# %% [markdown]
# The packed layout is not meant to be read, but the fast engine must join the q, k and v projections into one
# product, and the layout's tiles need not line up with each part. The kernel itself reads the values back: with
# the identity as input, and a step of 1 and zero point of 8 for every group, it returns $(q - 8) + 8 = q$.

# %%
show_source(int4.Int4Weight.unpacked)

# %%
layer = int4.Int4Linear(model.layers[0].mlp.gate_proj, 32)
values, _, _ = int4.quantize_groupwise(model.layers[0].mlp.gate_proj.weight, 32)
assert torch.equal(layer.quantized_weight().unpacked(), values)
x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
exact = x.double() @ layer.dequantized_weight().double().T
relative = ((layer(x).double() - exact).abs().max() / exact.abs().max()).item()
print(
    f"values read back exactly; product within {relative:.1e} of the exact one (bfloat16 inputs)"
)
assert relative < 2**-7

# %% [markdown]
# ## What it costs, on real text
#
# The same test as the int8 page: the first 1,024 tokens of Python's `textwrap.py`, perplexity, the mean KL
# divergence from the float32 model's next-token distribution, and top-1 agreement. One caveat shapes the whole
# comparison: the book's float32 weights *are* the GGUF file dequantized, already 5.5 bits per projection weight
# for the 0.5B model ({doc}`01_gguf_blocks`). Every scheme below quantizes on top of that, so "float32" here is the
# GGUF mix, and the star in the figure is that mix at its own bits. As on the int8 page, `minqwen.quantize` takes
# every projection and the LM head, which both checkpoints keep apart from the embedding.
#
# `scripts/quant_quality.py` measured every scheme on both models (the 1.5B takes several minutes on this CPU). This
# page recomputes the 0.5B's int4 point at $g = 32$ and checks it against the committed line:

# %%
quality = pd.read_json(QUANT / "quality-cpu-2026-11-30.jsonl", lines=True)
text_ids = torch.tensor([tok(inspect.getsource(textwrap))["input_ids"][:1024]])
quantized = minqwen.quantize(copy.deepcopy(model), "int4", group_size=32)
with torch.no_grad():
    log_p = model(text_ids).float().log_softmax(-1)[0]
    log_q = quantized(text_ids).float().log_softmax(-1)[0]
perplexity = math.exp(-log_q[:-1].gather(1, text_ids[0, 1:, None]).mean())
committed = quality.set_index(["model", "scheme"]).loc[
    ("Qwen2.5-Coder-0.5B-Instruct", "int4-g32")
]
print(
    f"int4, g = 32: perplexity {perplexity:.3f} here, {committed['perplexity']:.3f} committed"
)
assert abs(perplexity / committed["perplexity"] - 1) < 0.01

# %% tags=["hide-input"]
table = quality.assign(model=figures.short_names(quality["model"]))
table["vs float32"] = table.groupby("model")["perplexity"].transform(
    lambda p: p / p.iloc[0] - 1
)
columns = {
    "bits_per_weight": "bits per weight",
    "perplexity": "perplexity",
    "vs float32": "vs float32",
    "kl_nats": "KL (nats)",
    "top1_agreement": "top-1 agreement",
}
table = table.set_index(["model", "scheme"])[list(columns)].rename(columns=columns)
# A fixed uuid keeps the table's HTML the same from run to run (Styler draws a random one).
table.style.set_uuid("int4-quality").format(
    {
        "bits per weight": "{:.2f}",
        "perplexity": "{:.3f}",
        "vs float32": "{:+.1%}",
        "KL (nats)": "{:.4f}",
        "top-1 agreement": "{:.1%}",
    },
    na_rep="",
)

# %% [markdown]
# Three things stand out. int8 costs nothing measurable on either model. int4 costs real accuracy on the 0.5B, and
# smaller groups buy it back: the KL divergence falls by more than half from $g = 128$ to $g = 32$ (perplexity,
# measured on one text, is noisier than KL and not monotonic in $g$). And the 1.5B model's distribution moves about
# half as far as the 0.5B's at every setting (its perplexity cost is close to the 0.5B's at $g = 64$ and $128$),
# though the two start from different GGUF mixes, 5.5 and 4.8 bits.

# %% tags=["hide-input"]
figures.trade_off(quality)

# %% [markdown]
# Is that the grid's fault or ours? torchao, the reference library, quantized the same projections of both
# models in a second run of the script, side by side with `minqwen.quantize`: int8 through its own
# `Int8WeightOnlyConfig`, and int4 through the primitives of its `Int4WeightOnlyConfig` (tinygemm's grid, from
# bfloat16 weights), dequantized, because its int4 kernels need CUDA. Quality depends on the grid, not the kernel.

# %% tags=["hide-input"]
reference = pd.read_json(QUANT / "quality-torchao-cpu-2026-11-30.jsonl", lines=True)
reference["library"] = reference.scheme.map(
    lambda scheme: "torchao" if scheme.startswith("torchao-") else "minqwen"
)
reference["scheme"] = reference.scheme.str.removeprefix("torchao-")
reference["model"] = figures.short_names(reference["model"])
side_by_side = reference.pivot_table(
    index=["model", "scheme"],
    columns="library",
    values=["perplexity", "kl_nats", "top1_agreement"],
)
order = ["int8", "int4-g32", "int4-g64", "int4-g128"]
side_by_side = side_by_side.reindex(order, level="scheme")
side_by_side.style.set_uuid("int4-torchao").format("{:.4f}")

# %%
kl = side_by_side["kl_nats"]
ratio = kl.torchao / kl.minqwen
print(f"torchao's KL divergence over minqwen's: {ratio.min():.2f} to {ratio.max():.2f}")
assert ((ratio - 1).abs() < 0.1).all()

# %% [markdown]
# The two libraries' grids cost the same, to within 5% of KL divergence, on both models and at every setting,
# though torchao rounds from bfloat16 weights and minqwen from float32. That shows the implementation is right,
# and that what int4 loses here is the price of a min/max grid of sixteen levels. int8's top-1 agreement on the
# 0.5B is 97.9% for minqwen and 97.85% for torchao.
#
# ### A fitted grid: HQQ
#
# A min/max grid spends levels on a group's extremes, wherever the weights cluster. torchao's HQQ option
# (half-quadratic quantization) keeps the step but fits each group's zero point $z$ to the weights: a few
# iterations that shrink the error $e = w - s\,(q - z)$ towards zero with a sparsity-promoting penalty
# ($\lVert e \rVert_p^p$ with $p < 1$, so that most weights fit closely and a few outliers are left to miss), then
# move $z$ to the mean that the shrunken error implies,
#
# $$
# z \;\leftarrow\; \operatorname{mean}_i\!\left(q_i - \frac{w_i - e_i}{s}\right).
# $$
#
# It needs no data, only the weights. The same script measured it on both models in a third run, beside min/max
# from both libraries:

# %% tags=["hide-input"]
hqq_run = pd.read_json(QUANT / "quality-torchao-hqq-cpu-2026-12-01.jsonl", lines=True)
hqq_run["grid"] = hqq_run.scheme.map(
    lambda s: (
        "torchao HQQ"
        if s.startswith("torchao-hqq-")
        else ("torchao min/max" if s.startswith("torchao-") else "minqwen min/max")
    )
)
hqq_run["group"] = hqq_run.scheme.str.extract(r"g(\d+)$")[0].astype(int)
hqq_run["model"] = figures.short_names(hqq_run["model"])
hqq_table = hqq_run.pivot_table(
    index=["model", "group"],
    columns="grid",
    values=["kl_nats", "top1_agreement", "perplexity"],
)
hqq_table.style.set_uuid("int4-hqq").format("{:.4f}")

# %%
kl_hqq = hqq_table["kl_nats"]
gain = 1 - kl_hqq["torchao HQQ"] / kl_hqq["torchao min/max"]
print("KL divergence saved by HQQ over torchao's min/max grid:")
print(gain.map("{:.0%}".format).to_string())
assert (gain > 0).all()

# %% [markdown]
# HQQ lowers the KL divergence at every setting measured, by the shares printed above, at the same bits per
# weight. The gain is uneven, with no pattern by group size across the two models, and the other measures do not
# all follow: at $g = 32$ HQQ's top-1 agreement is lower than min/max on both models, and perplexity on one text
# moves either way. A fitted grid is a modest gain here, not a free one; minqwen keeps the min/max grid, which the
# kernels and the tests pin down exactly, and the fit is a few lines away for a reader who wants it (an exercise
# below).

# %% [markdown]
# ## What it buys on this CPU
#
# Three versions of the 0.5B, timed side by side through the fast engine (on a CPU it runs eagerly, with the fused
# projections): bfloat16, int8 and int4 at $g = 32$, with float32 through the eager loop as the baseline. Where
# llama.cpp's Python bindings are installed (`make llamacpp`, about ten minutes of compiling, so not part of
# `make test`), llama.cpp decoding the model's own GGUF file joins the same table: the run shown had them, a
# re-execution without them leaves that row out. Timings vary with the machine and its load, so this output is not
# compared between runs and nothing asserts on it.

# %% tags=["nbval-ignore-output"]
bf16 = copy.deepcopy(model).to(torch.bfloat16)


def fast_run(m):
    engine = FastQwen2(m)
    return lambda ids, n: engine.generate(ids, n, do_sample=False, eos_token_id=[])


contenders = {
    "float32, eager loop": lambda ids, n: minqwen.generate(
        model, ids, n, do_sample=False, eos_token_id=[]
    ),
    "bfloat16": fast_run(bf16),
    "int8 + bfloat16": fast_run(minqwen.quantize(copy.deepcopy(bf16), "int8")),
    "int4 g=32 + bfloat16": fast_run(
        minqwen.quantize(copy.deepcopy(bf16), "int4", group_size=32)
    ),
}
if MODEL_SOURCE in EMBEDDED and importlib.util.find_spec("llama_cpp"):
    contenders["llama.cpp, the GGUF file"] = bench.llamacpp_runner(MODEL_SOURCE)
speed = pd.DataFrame(
    {
        name: bench.measure(run, text_ids[:, :32], 12, repeats=3)
        for name, run in contenders.items()
    }
).T[["decode_tok_s"]]
speed["vs float32"] = speed["decode_tok_s"] / speed["decode_tok_s"].iloc[0]
speed.round(2)

# %% [markdown]
# In the run shown, int4 decoded several times as fast as float32, well ahead of int8, and close to llama.cpp
# reading its own GGUF file in hand-written SIMD kernels. Across the runs made for this page on this 2-core machine,
# int4 ranged from 85% to 102% of llama.cpp's speed and int8 from 60% to 72% (NOTES.md records them). Each step
# still makes a few hundred small Python-level calls, and the embedding, norms and attention stay in floating
# point, but a profile of the int8 step puts 82% of its time in the packed int8 matrix product: the weights' bytes
# set the pace.
#
# ### Bytes per token, and what llama.cpp reads
#
# How close may int8 come to llama.cpp? If both stream their weights equally fast, no closer than the ratio of the
# bytes each reads per token. A step reads every weight but the embedding table, of which it reads one row (unless
# the table is also the head, as in a model with tied weights; this file has a head of its own). For llama.cpp
# those bytes are in the GGUF file's tensor table; for minqwen, in the model's layers, final norm and head:


# %%
def step_bytes(m) -> int:
    """Bytes a decode step reads: layers, final norm and LM head, not the embedding table."""
    parts = (m.layers, m.norm, m.lm_head)
    return sum(
        t.nbytes for part in parts for t in (*part.parameters(), *part.buffers())
    )


read = {
    "bfloat16": step_bytes(bf16),
    "int8 + bfloat16": step_bytes(minqwen.quantize(copy.deepcopy(bf16), "int8")),
    "int4 g=32 + bfloat16": step_bytes(
        minqwen.quantize(copy.deepcopy(bf16), "int4", group_size=32)
    ),
}
if MODEL_SOURCE in EMBEDDED:
    tensors = GGUFReader(
        cache_dir() / "gguf" / EMBEDDED[MODEL_SOURCE].gguf_name
    ).tensors
    embedding_is_head = "output.weight" not in {t.name for t in tensors}
    read["llama.cpp, the GGUF file"] = sum(
        int(t.n_bytes)
        for t in tensors
        if t.name != "token_embd.weight" or embedding_is_head
    )
bytes_table = pd.DataFrame({"MB read per token": pd.Series(read) / 1e6})
if "llama.cpp, the GGUF file" in read:
    int8_bound = read["llama.cpp, the GGUF file"] / read["int8 + bfloat16"]
    print(f"int8 at llama.cpp's reading rate: at most {int8_bound:.0%} of its speed")
bytes_table.round(1)

# %% [markdown]
# The GGUF file mixes Q5_0, Q4_K and Q6_K in the layers with a Q8_0 head, under 7 bits per weight on average;
# minqwen's int8 keeps 8 bits and a float32 scale per row everywhere, its head included. At equal reading rates
# int8 can reach only the share printed above of llama.cpp's speed, so an aim of 80% of llama.cpp for int8, which
# this chapter was planned with, lies just beyond what its bytes allow. The speeds of the table above times these bytes give each contender's reading rate on this machine:

# %% tags=["nbval-ignore-output"]
rates = speed.join(bytes_table, how="inner")
rates["GB/s read"] = rates["decode_tok_s"] * rates["MB read per token"] / 1e3
rates[["decode_tok_s", "MB read per token", "GB/s read"]].round(1)

# %% [markdown]
# In the two runs made for this page (NOTES.md) int8 read at 77% and 91% of llama.cpp's rate, and at 90% and 98%
# of the rate at which bfloat16 read its twice as many bytes: PyTorch's int8 kernel streams about as well as its
# bfloat16 one. Most of what separates int8 from llama.cpp is bytes, the rest the kernel or this shared machine's
# noise: a faster int8 needs fewer bytes (a head in fewer bits, say) more than a faster kernel. int4 reads the fewest bytes and reads them slowest: its kernel unpacks two values from each
# byte and applies a step and a zero point per group, work that llama.cpp's hand-written kernels hide better.
#
# ## What it buys on an H200
#
# `scripts/gpu_quant_bench.py` timed the fast engine with random weights of the real configs, bf16 activations,
# batch 1, prompt 128, 128 new tokens, every variant side by side in one process. torchao 0.18's weight-only int8
# and int4 ($g = 128$, tinygemm's layout, the kernel ours uses) ran on the same fused weights through the same
# engine, as the reference. Each ratio is against bf16 measured in the same process: int8 in run 3 (bf16 at 995
# and 224 tok/s there), every other variant in runs 1 and 2, whose bf16 speed the first column shows. Cells marked
# "not measured" were left when a GPU call ran out of time.

# %% tags=["hide-input"]
runs = pd.read_json(QUANT / "decode-nvidia-h200-2026-11-30.jsonl", lines=True)
runs = runs[runs["batch_size"] == 1]
same_run_bf16 = runs[runs["variant"] == "bf16"].set_index(["run", "model"])[
    "decode_tok_s"
]
runs["vs bf16"] = (
    runs["decode_tok_s"].to_numpy()
    / same_run_bf16.loc[list(zip(runs["run"], runs["model"]))].to_numpy()
)
# int8 as committed (the Triton kernel) ran in run 3; every other variant in runs 1 and 2 (NOTES.md)
committed_int8 = runs["int8_path"].fillna("").str.startswith("Triton matrix-vector")
kept = runs[(runs["run"].isin([1, 2]) & (runs["variant"] != "int8")) | committed_int8]
speedup = kept.pivot(index="model", columns="variant", values="vs bf16")
speedup = speedup[
    ["int8", "int4-g128", "int4-g32", "torchao-int8", "torchao-int4-g128"]
]
figures.gpu_speedups(speedup)
speedup.insert(
    0,
    "bf16 tok/s",
    kept[kept["variant"] == "bf16"].set_index("model")["decode_tok_s"].round(),
)
speedup.style.set_uuid("int4-gpu").format("{:.2f}", na_rep="not measured").format(
    "{:.0f}", subset=["bf16 tok/s"]
)

# %% [markdown]
# At 7B, int4 decodes 1.57 times as fast as bf16, ahead of torchao's 1.45 on the same weights, but short of the 3.8
# times its bytes allow (3.8 GB a step against 14.1): it runs at about a third of its own byte
# {doc}`roofline <../ch4/05_performance>`, so the tinygemm kernel at one row, not memory, sets its pace. int8 gains
# nothing on the GPU yet: compiled PyTorch widens int8 to bf16 at about 1 TB/s, and the book's first Triton kernel
# for it (`minqwen.quant.int8_matvec`) does no better; torchao's int8 reaches 1.32 times at one row, and at batch 8
# falls to 55 tok/s against bf16's 1,655 (in the committed data). At 0.5B and 1.5B the step is bound by kernel
# launches ({doc}`../ch5/01_decode_profile`), so fewer bytes do not help, and the extra work of unpacking makes
# several variants slower, int8 at 0.5B most (0.66), where its kernel leaves most multiprocessors idle.
# `book/data/bench/NOTES.md` records each attempt.
#
# ## Quantizing at load time, and from the command line
#
# `Qwen2.from_pretrained(path, quantize="int4", group_size=32)` loads and quantizes in one call, and the command
# line takes the same choice:
#
# ```
# python -m minqwen generate "Write a Python function that reverses a string." \
#     --quantize int4 --group-size 32 --dtype bfloat16
# ```
#
# Bad choices fail before any weight is read: a group size that does not divide a layer's inputs names the layer.

# %%
try:
    minqwen.Qwen2.from_pretrained(model_path(), quantize="int4", group_size=256)
except ValueError as error:
    print(textwrap.fill(str(error), 100))

# %% [markdown]
# The fast engine runs a quantized model with its q/k/v and gate/up still joined. On the CPU it gives the eager
# loop's tokens exactly:

# %%
question = tok.apply_chat_template(
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    add_generation_prompt=True,
    return_tensors="pt",
)["input_ids"]
eager = minqwen.generate(quantized, question, 24, do_sample=False, eos_token_id=[])
assert torch.equal(
    FastQwen2(quantized).generate(question, 24, do_sample=False, eos_token_id=[]), eager
)
print(tok.decode(eager[0, question.shape[1] :]))

# %% [markdown]
# ## Memory while loading
#
# Quantizing saves memory only if the load does not first need the float model whole. After checking its
# arguments and the checkpoint's SHA256SUMS, `from_pretrained` checks every tensor's name and shape from the files'
# headers, then reads the tensors one at a time, each converted to the asked dtype as it arrives. As soon as a
# projection's weight and bias are in, it calls `weight_only.quantized` on that layer, and the float weight is
# dropped (the whole loader is shown in {doc}`../ch2/02_weight_map`):

# %%
show_source(weight_only.quantized)

# %% [markdown]
# The quantizers themselves, `int8.quantize_per_channel` and `int4.quantize_groupwise`, take a slice of
# `ROWS_PER_SLICE` (4,096) rows at a time: their float32 temporaries of the LM head (151,936 × 896, 545 MB in
# float32) would otherwise be several copies of it.
#
# `scripts/quant_memory.py` measures each scheme in a fresh process that loads the book's model and decodes 16
# tokens, on this 2-core machine, with three loaders side by side: the first, which read the whole checkpoint
# before quantizing; one layer at a time; and one layer at a time in slices of rows, today's. The memory a load
# needs is the process's own, anonymous memory at its peak. Its resident memory (the last column) also counts the
# pages of the 2.5 GB float32 file that safetensors maps in, which the kernel can drop again; a float32 load reads
# its tensors straight from those pages, which is why it needs almost nothing of its own. "model" is what the
# loaded model holds: the quantized layers plus the embedding and norms in bfloat16 (float32 for the float32 row).

# %% tags=["hide-input"]
memory = pd.read_json(QUANT / "memory-cpu-2026-11-30.jsonl", lines=True)
loaders = {
    "whole checkpoint": "whole checkpoint first",
    "one layer at a time, each": "one layer at a time",
    "one layer at a time, in slices": "... in slices of rows",
}
memory["loader"] = memory.label.map(
    lambda label: next(
        short for start, short in loaders.items() if label.startswith(start)
    )
)
memory_table = (
    memory.pivot(index="scheme", columns="loader", values="peak_anonymous_bytes") / 1e9
)
memory_table = memory_table.loc[
    list(dict.fromkeys(memory.scheme)), list(loaders.values())
]
memory_table.insert(0, "model", memory.groupby("scheme").model_bytes.first() / 1e9)
today = memory[memory.loader == "... in slices of rows"].set_index("scheme")
memory_table["resident, today"] = today.peak_rss_bytes / 1e9
memory_table.columns.name = "GB"
memory_table.round(2)

# %%
quantized_schemes = memory_table.drop(index=["float32", "bfloat16"])
saved = (
    1
    - quantized_schemes["... in slices of rows"]
    / quantized_schemes["whole checkpoint first"]
)
print(f"quantized loads now need {saved.min():.0%} to {saved.max():.0%} less")
assert (saved > 0.5).all()
bf16_today = memory_table.loc["bfloat16", "... in slices of rows"]
assert (quantized_schemes["... in slices of rows"] < bf16_today).all()

# %% [markdown]
# A quantized load now needs less memory than a bfloat16 one. For int8 the 1.46 GB is the 0.77 GB model, about
# 0.23 GB of Python and torch, the LM head read in bfloat16 (0.27 GB) while it is quantized, and some 0.2 GB of
# one slice's temporaries and the allocator's slack. Near the size of the machine's memory, that margin matters.

# %% [markdown]
# ## Summary
#
# - Group-wise int4 stores $q = \operatorname{round}((w - m)/s) \in [0, 15]$ with a step $s$ and minimum $m$ per
#   group of $g$ inputs: $4 + 32/g$ bits per weight, each weight within $s/2$ of the float32 grid.
# - PyTorch's int4 kernels take the grid as $(q - 8)s + z$, values packed two to a byte in a per-device layout; the
#   kernel itself reads the values back, which is how the fast engine joins projections.
# - On real text int8 is free; int4 costs the 0.5B model about 9% perplexity at $g = 32$ and the 1.5B 4.4%;
#   smaller groups buy accuracy for bits, and zero points fitted to the weights (HQQ) lower the KL divergence by
#   3% to 28% at no cost in bits, though not every other measure follows.
# - On this CPU int4 decodes several times as fast as float32, about as fast as llama.cpp; int8 is held below 80% of
#   llama.cpp mostly by its bytes: it reads about a quarter more per token than the GGUF file's mix.
# - On an H200 int4 gives 1.57 times bf16 at 7B, and nothing, or less than nothing, at the launch-bound small
#   sizes. int8 on the GPU needs a better kernel than the book has yet.
# - `from_pretrained` quantizes each projection as soon as it is read, a slice of rows at a time, so a quantized
#   load needs less than half the memory it took when the whole float checkpoint came first.
#
# ## Exercises
#
# ````{exercise}
# :label: int4-symmetric
# Quantize the same gate projection with a symmetric grid, levels $-8 \dots 7$ times $\max|w| / 7.5$ per group of
# 32 and no zero point. How does its RMS error compare with the asymmetric grid's?
# ````
#
# ```{solution-start} int4-symmetric
# :class: dropdown
# ```

# %%
groups = weight.reshape(weight.shape[0], -1, 32)
scale = groups.abs().amax(-1, keepdim=True) / 7.5
symmetric = (torch.round(groups / scale).clamp(-8, 7) * scale).reshape(
    weight.shape
) - weight
print(
    f"RMS error: symmetric {symmetric.square().mean().sqrt():.3e}, asymmetric {rms['g = 32']:.3e}"
)

# %% [markdown]
# The symmetric grid must reach the larger of the two ends on both sides, so its step is coarser whenever a group
# is lopsided; the zero point costs 16 bits per group and buys that back.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: int4-bytes
# Count the bytes of the int4 model's quantized layers at $g = 32$ (every projection, and the LM head, which this
# checkpoint keeps apart from the embedding): how many bits per weight, and how many bytes in all against the same
# layers in float32?
# ````
#
# ```{solution-start} int4-bytes
# :class: dropdown
# ```

# %%
layers = [m for m in quantized.modules() if isinstance(m, int4.Int4Linear)]
count = sum(m.in_features * m.out_features for m in layers)
stored = sum(m.weight_int4.nbytes + m.scales_and_zeros.nbytes for m in layers)
print(f"{8 * stored / count:.3f} bits per weight")
print(f"{stored / 1e6:.0f} MB, against {4 * count / 1e6:.0f} MB in float32")

# %% [markdown]
# Five bits per weight at $g = 32$: the packed values take four and the bfloat16 step and zero point one more.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: int4-hqq
# Fit HQQ's zero points by hand for the same gate projection at $g = 128$: start from the min/max grid, then
# repeat twenty times: quantize, shrink the error with the proximal step of $\lVert e \rVert_{0.7}^{0.7}$, and set
# $z$ to the mean the formula above gives. Compare the mean absolute and the RMS weight error with min/max.
# ````
#
# ```{solution-start} int4-hqq
# :class: dropdown
# ```


# %%
def shrink(e, beta, p=0.7):
    """The proximal step of |e|^p / beta: small errors go to zero, large ones stay almost whole."""
    return torch.sign(e) * torch.relu(
        e.abs() - e.abs().clamp(min=1e-12).pow(p - 1) / beta
    )


w = weight.reshape(weight.shape[0], -1, 128)
low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
step = (high - low) / 15
zero = torch.round(-low / step)  # in levels: w is about step * (q - zero)


def error_of(zero):
    return (torch.round(w / step + zero).clamp(0, 15) - zero) * step - w


minmax = error_of(zero)
beta = 10.0
for _ in range(20):
    q = torch.round(w / step + zero).clamp(0, 15)
    e = shrink(w - (q - zero) * step, beta)
    zero = (q - (w - e) / step).mean(-1, keepdim=True)
    beta *= 1.01
fitted = error_of(zero)
for name, err in (("min/max", minmax), ("fitted", fitted)):
    print(
        f"{name:8}: mean |error| {err.abs().mean():.3e}, RMS {err.square().mean().sqrt():.3e}"
    )
assert fitted.abs().mean() < minmax.abs().mean()

# %% [markdown]
# The fitted zero points lower both errors, by a few percent on this matrix: the $p < 1$ penalty moves each grid
# towards where most of its group's weights sit, at the price of the few at a group's edges, which the min/max grid
# reached exactly and the fitted one may clip. Small on one matrix; the KL divergences above measure what it does
# to the model's output.
#
# ```{solution-end}
# ```
