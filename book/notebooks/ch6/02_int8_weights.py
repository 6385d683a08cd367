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
# # Weights in 8 bits
#
# {doc}`The previous page <01_gguf_blocks>` read the formats someone else chose. This one quantizes the model
# itself, in the simplest scheme that works: every projection's weight stored as int8, with one scale per output
# channel, and the activations left in floating point. What does it cost in accuracy, measured on real text,
# and what does it buy on this machine's CPU?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - symmetric per-channel int8 quantization, its formula, and the bound on its rounding error;
# - how a quantized linear layer computes: integer values, then one scale per output;
# - how to measure what quantization costs: perplexity on held-out text, the KL divergence of the next-token
#   distribution, and how often the most likely token changes;
# - what fewer bytes per weight buy in decoding speed on a CPU.
#
# **You need** the roofline argument of {doc}`../ch4/05_performance` (decoding streams every weight once per
# token) and the block formats of {doc}`01_gguf_blocks`. Running it takes the embedded model (about a minute).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import int8_weights as figures
from helpers import model_path, show_source, stamp, tokenizer

import copy
import inspect
import math
import textwrap

import pandas as pd
import torch

import minqwen
from minqwen.quant import int8
from minqwen.tools import bench

model = minqwen.Qwen2.from_pretrained(model_path())
tok = tokenizer()
print(stamp())

# %% [markdown]
# ## One scale per output channel
#
# A weight matrix $W$ maps the input to outputs $o = 1 \dots n$. Quantizing row $o$ picks a scale $s_o$ so that
# its largest magnitude lands on 127, and rounds every weight to the nearest multiple of it:
#
# $$
# s_o = \frac{\max_i |W_{oi}|}{127}, \qquad q_{oi} = \operatorname{round}\!\left(\frac{W_{oi}}{s_o}\right)
# \in [-127, 127], \qquad |s_o q_{oi} - W_{oi}| \le \frac{s_o}{2}.
# $$
#
# One scale per row rather than one for the whole matrix matters: a single large row would otherwise make the
# step coarse for every other row. Symmetric means no offset: zero stays exactly zero.

# %%
show_source(int8.quantize_per_channel)

# %% [markdown]
# The loop over slices of `ROWS_PER_SLICE` (4,096) rows changes no value; it keeps the float32 temporaries of a
# large matrix, the LM head above all, to one slice's worth while a model is quantized as it loads
# ({doc}`03_int4_weights` measures the memory).
#
# On the gate projection of the first layer, every weight lands within half a step of its int8 value, and the
# error, measured in steps, spreads evenly over that half-step either way:

# %%
weight = model.layers[0].mlp.gate_proj.weight.detach()
values, scales = int8.quantize_per_channel(weight)
in_steps = (values.float() * scales[:, None] - weight) / scales[:, None]
print(
    f"largest error: {in_steps.abs().max():.4f} steps; rows {weight.shape[0]}, one scale each"
)
assert in_steps.abs().max() <= 0.5 + 1e-5
figures.rounding_error(in_steps.flatten().numpy())

# %% [markdown]
# ## The quantized layer
#
# Each output is a sum over the row, so its scale can wait until the sum is done:
#
# $$ y_o = \sum_i x_i\, s_o q_{oi} = s_o \sum_i x_i\, q_{oi}. $$
#
# `Int8Linear` keeps $q$ as int8 and $s$ as float32, and hands both to `Int8Weight.matmul`. On a CPU in bfloat16
# the product is PyTorch's packed int8 kernel, `torch._weight_int8pack_mm`, which reads the int8 matrix directly; on
# CUDA a decode step's few rows go to a small Triton kernel ({doc}`03_int4_weights` measures it); otherwise the int8
# matrix is widened to the activations' type first, which saves memory but not time.

# %%
show_source(int8.Int8Weight.matmul)

# %% [markdown]
# `minqwen.quantize` replaces every attention and MLP projection of a loaded model. This checkpoint's LM head is
# its own matrix (see {doc}`01_gguf_blocks`), so it is quantized too:

# %%
quantized = minqwen.quantize(copy.deepcopy(model))


def weight_bytes(m):
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


print(
    f"float32: {weight_bytes(model) / 1e9:.2f} GB; int8 projections: "
    f"{weight_bytes(quantized) / 1e9:.2f} GB (the embedding and norms stay float32)"
)
layer = quantized.layers[0].mlp.gate_proj
x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
exact = x.double() @ layer.dequantized_weight().double().T
assert torch.allclose(layer(x).double(), exact, rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## What it costs, on real text
#
# The held-out text is `textwrap.py` from Python's standard library: about a thousand tokens of real code and
# English docstrings, which neither model was tuned on for this page. Three numbers compare the quantized model
# with the original, from one forward pass of each over the text:
#
# - **perplexity** $\exp\big(-\frac{1}{N}\sum_t \log p(x_{t+1} \mid x_{\le t})\big)$, how surprised each model is
#   by the text;
# - the mean **KL divergence** $\sum_v p(v) \log \frac{p(v)}{p_q(v)}$ of the quantized model's next-token
#   distribution $p_q$ from the original's $p$, at every position;
# - **top-1 agreement**, how often both put the same token first.

# %%
text_ids = torch.tensor([tok(inspect.getsource(textwrap))["input_ids"][:1024]])
with torch.no_grad():
    log_p = model(text_ids).float().log_softmax(-1)[0]
    log_q = quantized(text_ids).float().log_softmax(-1)[0]
following = text_ids[0, 1:, None]
quality = pd.Series(
    {
        "perplexity, float32": math.exp(-log_p[:-1].gather(1, following).mean()),
        "perplexity, int8": math.exp(-log_q[:-1].gather(1, following).mean()),
        "mean KL(p || p_q), nats": (log_p.exp() * (log_p - log_q))
        .sum(-1)
        .mean()
        .item(),
        "top-1 agreement": (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item(),
    }
)
print(quality.round(4).to_string())
assert quality["mean KL(p || p_q), nats"] < 0.01 and quality["top-1 agreement"] > 0.95
assert abs(quality["perplexity, int8"] / quality["perplexity, float32"] - 1) < 0.01

# %% [markdown]
# The perplexities agree to three significant digits, the distributions are a thousandth of a nat apart on
# average, and about one position in fifty puts a different token first: positions where the original was
# already hesitating between two. Where the model is sure, 8 bits change nothing:

# %% tags=["hide-input"]
confidence = log_p.exp().amax(-1)
changed = log_p.argmax(-1) != log_q.argmax(-1)
figures.changes_by_confidence(confidence.numpy(), changed.numpy())
print(
    f"top-1 changes at {int(changed.sum())} of {changed.numel()} positions; "
    f"the most confident of them: p = {confidence[changed].max():.2f}"
)

# %% [markdown]
# ## What it buys on this CPU
#
# Decoding streams every weight once per token, so a model a quarter the size should decode up to four times
# faster, if the kernel reads int8 as fast as float32. Three versions of the model, timed side by side with the
# benchmark of {doc}`../ch4/05_performance`: float32, bfloat16, and int8 projections with bfloat16 activations.
# Timings vary with the machine and its load, so this output is not compared between runs, and nothing asserts
# on it.

# %% tags=["nbval-ignore-output"]
prompt = text_ids[:, :32]
versions = {
    "float32": model,
    "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
    "int8 + bfloat16": copy.deepcopy(quantized).to(torch.bfloat16),
}
speed = pd.DataFrame(
    {
        name: bench.measure(
            lambda ids, n, m=m: minqwen.generate(
                m, ids, n, do_sample=False, eos_token_id=[]
            ),
            prompt,
            12,
            repeats=3,
        )
        for name, m in versions.items()
    }
).T[["decode_tok_s"]]
speed["GB of weights"] = [weight_bytes(m) / 1e9 for m in versions.values()]
speed.round(2)

# %% [markdown]
# In the run shown, bfloat16 alone decodes well over twice as fast as float32 (half the bytes, and this CPU
# multiplies bfloat16 in hardware), and int8 projections about twice as fast again, a little more than the
# ratio of their bytes: speed follows bytes, as the roofline says. The quantized model's tokens on a real
# prompt:

# %%
question = tok.apply_chat_template(
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    add_generation_prompt=True,
    return_tensors="pt",
)["input_ids"]
greedy = {
    name: minqwen.generate(m, question, 24, do_sample=False, eos_token_id=[])[
        0, question.shape[1] :
    ]
    for name, m in (("float32", model), ("int8", quantized))
}
same = int((greedy["float32"] == greedy["int8"]).cumprod(0).sum())
print(f"int8 and float32 agree on the first {same} of 24 greedy tokens")
print(repr(tok.decode(greedy["int8"])))

# %% [markdown]
# ## Summary
#
# - Per-channel symmetric int8 stores $q_{oi} = \operatorname{round}(W_{oi}/s_o)$ with $s_o = \max_i |W_{oi}| /
#   127$; every weight is within $s_o/2$, and the scale is applied once per output.
# - On `textwrap.py`, int8 projections keep the perplexity within 0.1%, the KL divergence near $10^{-3}$ nats
#   and top-1 agreement near 98%; the changes fall where the model was unsure.
# - On this CPU, in the run shown, int8 projections with bfloat16 activations decoded several times as fast as
#   float32 and about twice as fast as bfloat16: decoding speed follows the bytes per token.
# - `minqwen.quantize(model)` runs through `model(ids)`, `minqwen.generate` and the fast engine;
#   {doc}`03_int4_weights` takes the weights down to 4 bits.
#
# ## Exercises
#
# ````{exercise}
# :label: int8-per-tensor
# Quantize the same gate projection with one scale for the whole matrix instead of one per row. How much larger
# is the largest error, and the mean?
# ````
#
# ```{solution-start} int8-per-tensor
# :class: dropdown
# ```

# %%
one_scale = weight.abs().max() / 127
per_tensor = (
    torch.round(weight / one_scale).clamp(-127, 127) * one_scale - weight
).abs()
per_channel = (values.float() * scales[:, None] - weight).abs()
print(
    f"largest error: per tensor {per_tensor.max():.2e}, per channel {per_channel.max():.2e}; "
    f"mean: {per_tensor.mean():.2e} against {per_channel.mean():.2e}"
)

# %% [markdown]
# One shared scale is set by the largest weight of the whole matrix, so every other row rounds on a coarser grid.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: int8-bytes
# How many bytes per weight does an int8 projection take with its scales, and what share of the quantized
# model's bytes do the parts left in float32 hold?
# ````
#
# ```{solution-start} int8-bytes
# :class: dropdown
# ```

# %%
layers = [m for m in quantized.modules() if isinstance(m, int8.Int8Linear)]
count = sum(m.weight_int8.numel() for m in layers)
stored = sum(m.weight_int8.numel() + 4 * m.scales.numel() for m in layers)
print(f"{stored / count:.4f} bytes per weight with the scales")
print(
    f"float32 remainder: {1 - stored / weight_bytes(quantized):.0%} of the quantized model's bytes"
)

# %% [markdown]
# The scales add a float per row, nearly nothing. The embedding table, 151,936 x 896 floats, stays float32 and
# is most of what remains: quantizing it, or storing it in bfloat16, is the next saving.
#
# ```{solution-end}
# ```
