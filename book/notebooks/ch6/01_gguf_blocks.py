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
# # Inside a quantized file: GGUF's block formats
#
# The book's model arrives as a {term}`GGUF` file ({doc}`the weights page <../ch0/01_weights>`), 491 MB for a
# model whose float32 checkpoint takes 2.5 GB. Until now a library turned it into floats for us. This page opens
# the file's tensors byte by byte: how a few bits per weight plus a scale per block stand for real numbers, in
# the four formats the file uses, dequantized here in plain PyTorch and checked bit for bit against the
# reference. Decoding reads every weight once per token, so bytes per weight is the next lever on speed; this is
# what fewer bytes look like.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how a quantized tensor is stored: blocks of 32 or 256 values, each with its own scale;
# - the byte layout and the formula of Q8_0, Q5_0, Q4_K and Q6_K, each beside the PyTorch that decodes it;
# - that these few lines reproduce the reference dequantization bit for bit, on every tensor of the file;
# - why the file's embedding and LM head differ although they come from one matrix.
#
# **You need** the checkpoint files of {doc}`../ch0/01_weights` and the idea of {term}`bf16` rounding from
# {doc}`../ch3/05_rmsnorm`. Running it takes the embedded model's GGUF file, which `make` keeps in the cache
# (under a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import gguf_blocks as figures
from helpers import show_source

import numpy as np
import pandas as pd
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as reference_dequantize

import minqwen
from minqwen import weights
from minqwen.quant import gguf_blocks
from minqwen.quant.gguf_blocks import BLOCK_FORMATS, dequantize

minqwen.fetch("embedded")
GGUF_FILE = weights.cache_dir() / "gguf" / weights.EMBEDDED["embedded"].gguf_name
if not GGUF_FILE.is_file():
    raise FileNotFoundError(
        f"{GGUF_FILE} is missing: delete the cached embedded model and run `python -m minqwen fetch embedded`"
    )
tensors = {t.name: t for t in GGUFReader(GGUF_FILE).tensors}


def raw_and_shape(name):
    """A tensor's raw bytes as a uint8 tensor, its format and its shape (rows first)."""
    t = tensors[name]
    raw = torch.from_numpy(np.array(t.data, copy=True)).reshape(-1)
    return raw, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))


# %% [markdown]
# ## What the file holds
#
# Every tensor has a type. Norms and biases stay float32; the matrices are quantized, in four formats chosen
# per tensor by the tool that made the file (llama.cpp), with more bits where errors hurt most:

# %% tags=["hide-input"]
rows = []
for name, t in tensors.items():
    role = (
        name.split(".")[-2] if name.startswith("blk.") else name.removesuffix(".weight")
    )
    rows.append({"role": role, "format": t.tensor_type.name, "bytes": int(t.n_bytes)})
held = pd.DataFrame(rows)
by_format = held.groupby("format").agg(tensors=("role", "size"), MB=("bytes", "sum"))
by_format["MB"] = (by_format.MB / 1e6).round(1)
print(f"{len(tensors)} tensors, {held.bytes.sum() / 1e6:.0f} MB")
by_format

# %% tags=["hide-input"]
held[held.format != "F32"].pivot_table(
    index="role", columns="format", values="bytes", aggfunc="size", fill_value=0
)

# %% [markdown]
# Most matrices are Q5_0. The LM head (`output`) and half the value projections get 8 bits, and the down
# projections alternate between the two "K" formats, Q6_K and Q4_K. Each format packs a fixed number of values
# into a fixed number of bytes:

# %% tags=["hide-input"]
figures.block_layouts({fmt: values for fmt, (values, _) in BLOCK_FORMATS.items()})

# %% [markdown]
# Every format has a scale $d$ per block, stored as a float16; small integers $q$ times $d$ give the values back.
# A block is 32 values (the "_0" formats) or a super-block of 256 with a scale per sub-block (the "K" formats).
# The arithmetic is exactly ggml's, float32 in the same order, so "the same" below means the same bits.


# %% tags=["hide-input"]
def check(fmt, name):
    """Our dequantization of `name` against the gguf library's, as one line."""
    raw, found, shape = raw_and_shape(name)
    assert found == fmt
    ours = dequantize(raw, fmt, shape)
    theirs = torch.from_numpy(
        reference_dequantize(tensors[name].data, tensors[name].tensor_type)
    )
    same = torch.equal(ours.view(torch.int32), theirs.reshape(shape).view(torch.int32))
    print(f"{name} ({fmt}, {shape[0]} x {shape[1]}): bit for bit as gguf's: {same}")
    assert same
    return ours


# %% [markdown]
# ## Q8_0: a scale and 32 bytes
#
# The simplest: 2 bytes of scale, then 32 signed bytes. With $q_i \in [-128, 127]$,
#
# $$ x_i = d\, q_i. $$

# %%
show_source(gguf_blocks.dequantize_q8_0)
head = check("Q8_0", "output.weight")

# %% [markdown]
# ## Q5_0: five bits, split across two places
#
# Five bits per value do not fit bytes evenly, so Q5_0 stores the low four bits of its 32 values as 16 bytes of
# nibble pairs (values $0$-$15$ in the low nibbles, $16$-$31$ in the high ones) and their fifth bits together in
# one 32-bit word. The value is centred on 16:
#
# $$ q_i = \ell_i + 16\, h_i \in [0, 31], \qquad x_i = d\,(q_i - 16). $$

# %%
show_source(gguf_blocks.dequantize_q5_0)
embedding = check("Q5_0", "token_embd.weight")

# %% [markdown]
# ## Q4_K: a scale and a minimum per sub-block
#
# The "K" formats spend their bits on scales too. A Q4_K super-block holds 8 sub-blocks of 32 four-bit values.
# Each sub-block $j$ has its own 6-bit scale $s_j$ and 6-bit minimum $m_j$, scaled in turn by the super-block's
# two float16s $d$ and $d_\text{min}$:
#
# $$ x_i = (d\, s_j)\, q_i - d_\text{min}\, m_j, \qquad q_i \in [0, 15]. $$
#
# With a minimum, a sub-block whose values are all positive, say, uses all 16 levels instead of half. Sixteen
# 6-bit numbers take 12 bytes, packed so that the first four scales and minimums sit whole in the low six bits
# of bytes 0-7, and the last four are spread over bytes 8-11 and the spare top bits:

# %%
show_source(gguf_blocks.q4_k_scales_and_minimums)
show_source(gguf_blocks.dequantize_q4_k)
down_q4 = check(
    "Q4_K", next(n for n, t in tensors.items() if t.tensor_type.name == "Q4_K")
)

# %% [markdown]
# ## Q6_K: sixteen scales of 8 bits
#
# Q6_K has 16 sub-blocks of 16 six-bit values, each sub-block with a signed 8-bit scale $s_j$, and no minimum;
# values are centred on 32. The four low bits come from nibbles and the two high bits from a byte shared by
# four values:
#
# $$ x_i = (d\, s_j)\,(q_i - 32), \qquad q_i \in [0, 63]. $$

# %%
show_source(gguf_blocks.dequantize_q6_k)
down_q6 = check(
    "Q6_K", next(n for n, t in tensors.items() if t.tensor_type.name == "Q6_K")
)

# %% [markdown]
# One tensor of each format is the same to the bit; `tests/test_ch6_gguf_blocks.py` checks all 170 quantized
# tensors of the file, and random blocks of each format, the same way.
#
# ## One matrix, quantized twice
#
# Qwen2.5-0.5B ties its LM head to its embedding: one matrix of 151,936 x 896 serves both. The file stores it
# twice, as the embedding in Q5_0 and as the LM head in Q8_0 (a separate `output` tensor). If both
# are roundings of the same matrix, they may differ by about one Q5_0 rounding, half a step $d$ of the
# embedding's block, plus the much smaller Q8_0 rounding:

# %%
raw, _, shape = raw_and_shape("token_embd.weight")
step = (
    gguf_blocks.float16_at(raw.reshape(-1, 22), 0)
    .repeat_interleave(32, dim=1)
    .reshape(shape)
)
in_steps = ((embedding - head) / step)[step != 0]
within_half = (in_steps.abs() <= 0.5).float().mean().item()
print(
    f"|embedding - LM head|: largest {in_steps.abs().max():.2f} steps; "
    f"{within_half:.1%} of weights within half a step"
)
assert in_steps.abs().max() < 1.1 and within_half > 0.9
figures.twice_quantized(in_steps.numpy())

# %% [markdown]
# Nearly every weight of the two copies lies within half a step of each other, and none beyond about one: two
# roundings of one matrix (llama.cpp's Q5_0 rounding can move a value a little more than half a step, to lower
# the error over the whole block). The book's checkpoint keeps both copies, which is why its `config.json` does
# not tie the two, and its "0.5B" has 136 million more parameters than the released model:

# %%
state = minqwen.Qwen2.from_pretrained(minqwen.fetch("embedded")).state_dict()
assert torch.equal(state["embed_tokens.weight"], embedding)
assert torch.equal(state["lm_head.weight"], head)
print(
    "the checkpoint's embedding is the Q5_0 copy, its LM head the Q8_0 copy, to the bit"
)

# %% [markdown]
# ## Summary
#
# - A quantized GGUF tensor is a run of blocks; each block stores small integers and a float16 scale, and the
#   values come back as $x = d\,q$ (Q8_0), $d(q - 16)$ (Q5_0), $(d s_j) q - d_\text{min} m_j$ (Q4_K) or
#   $(d s_j)(q - 32)$ (Q6_K).
# - Bits per weight include the scales: 8.5 for Q8_0, 5.5 for Q5_0, 4.5 for Q4_K, 6.5625 for Q6_K.
# - A few lines of PyTorch per format reproduce the reference dequantization bit for bit, on every tensor of the
#   file.
# - The file quantizes the tied embedding and LM head separately, at 5 and 8 bits; the book's checkpoint keeps
#   both copies.
#
# ## Exercises
#
# ````{exercise}
# :label: gguf-bits
# How many bits per weight does the whole file spend on its quantized matrices, and how many bytes would the
# same matrices take in bf16?
# ````
#
# ```{solution-start} gguf-bits
# :class: dropdown
# ```

# %%
quantized = held[held.format != "F32"]
count = sum(
    int(np.prod(tensors[n].shape))
    for n in tensors
    if tensors[n].tensor_type.name != "F32"
)
print(
    f"{8 * quantized.bytes.sum() / count:.2f} bits per weight; "
    f"{quantized.bytes.sum() / 1e6:.0f} MB against {2 * count / 1e6:.0f} MB in bf16"
)

# %% [markdown]
# A little over six bits per weight on average: most matrices are Q5_0, the LM head is 8-bit, the down
# projections are 4.5 or 6.6.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: gguf-q8
# Quantize one block of 32 numbers to Q8_0 yourself: $d = \max_i |x_i| / 127$, $q_i = \operatorname{round}(x_i /
# d)$, stored as float16 and int8. Check your bytes against `gguf.quants.quantize`, and the largest error after
# dequantizing against $d/2$.
# ````
#
# ```{solution-start} gguf-q8
# :class: dropdown
# ```

# %%
from gguf import GGMLQuantizationType
from gguf.quants import quantize

x = np.random.default_rng(0).normal(size=32).astype(np.float32)
d = np.abs(x).max() / 127
q = np.round(x / d).astype(np.int8)
block = np.concatenate([np.float16(d).reshape(1).view(np.uint8), q.view(np.uint8)])
print(
    f"same bytes as gguf: {np.array_equal(block, quantize(x[None], GGMLQuantizationType.Q8_0)[0])}"
)
back = dequantize(torch.from_numpy(block), "Q8_0", (32,)).numpy()
print(f"largest error {np.abs(back - x).max():.4f} against d/2 = {d / 2:.4f}")

# %% [markdown]
# The bytes match; the error stays within half a step, plus the float16 rounding of $d$ itself.
#
# ```{solution-end}
# ```
