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
# # RMSNorm
#
# Every decoder layer normalises its input twice, once before attention and once before the MLP, and the model
# normalises once more before the LM head. What does that normalisation compute, why does Qwen2 take its mean
# of squares in float32 even when every weight is bf16, and how do we know minqwen's version is HF's to the last
# bit?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - what RMSNorm computes, and what it leaves out compared with LayerNorm;
# - why the mean of squares is taken in float32, measured on the real model's hidden states;
# - how large a model's activations grow, layer by layer ("massive activations").
#
# **You need** the layout of a decoder layer from {doc}`../ch2/01_architecture`, and the idea of a relative
# error and a ulp from {doc}`../ch2/03_layer_probe`. Running it takes the embedded model (about a minute on a
# laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import rmsnorm as figures
from helpers import (
    DEVICE,
    DTYPE,
    diff_stats,
    diff_table,
    model_path,
    show_source,
    tokenizer,
    tolerance,
)

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from minqwen.model.config import ModelConfig
from minqwen.model.layers import RMSNorm, rms_norm

torch.manual_seed(0)
hf = AutoModelForCausalLM.from_pretrained(model_path(), dtype=DTYPE).to(DEVICE).eval()
config = ModelConfig.from_file(model_path())

# %% [markdown]
# ## What it computes
#
# RMSNorm divides each token's vector $x \in \mathbb{R}^d$ by its root mean square, then scales each channel by a
# learned weight $w$:
#
# $$
# \operatorname{RMSNorm}(x) = w \odot \frac{x}{\operatorname{RMS}(x)},
# \qquad
# \operatorname{RMS}(x) = \sqrt{\frac{1}{d}\sum_{i=1}^{d} x_i^2 + \varepsilon}.
# $$
#
# LayerNorm, which the original Transformer used, also subtracts the mean $\mu$ and adds a bias $b$:
# $w \odot (x - \mu)/\sqrt{\sigma^2 + \varepsilon} + b$. RMSNorm drops both, one reduction instead of two, and
# models train just as well without them. The $\varepsilon$ keeps an all-zero vector from dividing by zero; Qwen2.5
# stores it as 1e-6, which `config.json` holds as the nearest float32:

# %%
print(f"rms_norm_eps = {config.rms_norm_eps!r}")

# %% [markdown]
# Here is minqwen's implementation, the one every layer calls. The line `x * torch.rsqrt(...)` is the fraction
# above, $x / \operatorname{RMS}(x)$; the final product is $w \odot \cdot$.

# %%
show_source(rms_norm)

# %% [markdown]
# ## The inputs it sees
#
# Hooks on every `input_layernorm` and on the final `norm` record what each receives while HF runs one prompt.
# The residual stream grows through the layers, and a few channels grow far more than the rest: the "massive
# activations" many LLMs develop. Those large values are why the precision of the next section matters.

# %% tags=["hide-input"]
prompt = (
    "SELECT name, COUNT(*) AS orders FROM customers "
    "JOIN orders USING (customer_id) GROUP BY name;"
)
ids = tokenizer()(prompt, return_tensors="pt").input_ids.to(DEVICE)
norms = {f"layer {i}": layer.input_layernorm for i, layer in enumerate(hf.model.layers)}
norms["final"] = hf.model.norm
captured = {}
hooks = [
    module.register_forward_hook(
        lambda module, args, out, name=name: captured.update({name: (args[0], out)})
    )
    for name, module in norms.items()
]
with torch.no_grad():
    hf(ids)
for hook in hooks:
    hook.remove()

figures.input_magnitudes({name: x for name, (x, _) in captured.items()})

# %% [markdown]
# ## Bit for bit against HF
#
# minqwen's `RMSNorm` module, loaded with each norm's weight, is fed exactly the input HF's norm received; a
# version written straight from the formula, dividing by `sqrt` instead of multiplying by `rsqrt`, runs beside it.


# %%
def rmsnorm_from_the_formula(x, weight, eps):
    x32 = x.float()
    rms = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 / rms).to(x.dtype)


pairs = {}
with torch.no_grad():
    for name, module in norms.items():
        x, hf_out = captured[name]
        ours = RMSNorm(config.hidden_size, config.rms_norm_eps).to(DEVICE, DTYPE)
        ours.load_state_dict(module.state_dict())
        pairs[f"{name}: minqwen"] = (ours(x), hf_out)
        pairs[f"{name}: formula"] = (
            rmsnorm_from_the_formula(x, module.weight, ours.eps),
            hf_out,
        )

identical = [
    name for name, (a, b) in pairs.items() if "minqwen" in name and torch.equal(a, b)
]
formula_error = max(
    diff_stats(a, b)["max_rel"] for n, (a, b) in pairs.items() if "formula" in n
)
print(f"minqwen: {len(identical)}/{len(norms)} norms bit-identical to HF's")
print(f"from the formula: max relative error {formula_error:.1e}")
assert len(identical) == len(norms)
assert formula_error <= tolerance("elementwise")

# %% [markdown]
# minqwen's module is HF's arithmetic, operation for operation, so its outputs are equal, not just close. The
# version from the formula rounds once more (a division where HF multiplies by a reciprocal root), which costs a
# few float32 ulps. The full table is folded below.

# %% tags=["remove-input", "hide-output"]
diff_table(pairs)

# %% [markdown]
# ## Why the mean of squares is taken in float32
#
# `rms_norm` casts `x` to float32 first: the squares, their mean, `rsqrt` and the scaling all run in float32, and
# only the normalised vector is rounded back to the working dtype before the weight multiplies it. Without the
# upcast every one of those steps is rounded to bf16, which keeps 8 significant bits, so each step can be off by
# a relative
#
# $$
# u_{\text{bf16}} = 2^{-8} \approx 3.9 \times 10^{-3}.
# $$
#
# With the upcast only two roundings to bf16 remain (the normalised vector, then its product with the weight),
# so the error of a whole norm is bounded by about $2u = 2^{-7}$. Without it the errors of the squares, the sum
# of 896 terms and the root add up. We measure both on the real hidden states rounded to bf16, against a float64
# reference, so the inputs are identical and only the arithmetic differs.


# %%
def rmsnorm_without_upcast(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def error_in_bf16(norm, name):
    """Max relative error of `norm` on one norm's input rounded to bf16, against float64."""
    x, w = captured[name][0].bfloat16(), norms[name].weight.bfloat16()
    x64, eps = x.double(), config.rms_norm_eps
    exact = w.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return diff_stats(norm(x, w, eps), exact)["max_rel"]


with torch.no_grad():
    errors = pd.DataFrame(
        {
            "with upcast": [error_in_bf16(rms_norm, name) for name in norms],
            "without": [error_in_bf16(rmsnorm_without_upcast, name) for name in norms],
        },
        index=list(norms),
    )
medians = errors.median()
print(
    f"median error: {medians['with upcast']:.1e} with the upcast, "
    f"{medians['without']:.1e} without ({medians['without'] / medians['with upcast']:.1f}x)"
)
figures.upcast_errors(errors, bound=2**-7)
assert errors["with upcast"].max() <= 2**-7
assert medians["without"] > medians["with upcast"]

# %% [markdown]
# With the upcast, every norm of every layer stays under the $2^{-7}$ bound. Without it the median error is
# larger, by the factor printed above; in bf16 the upcast buys accuracy, not survival.
#
# In float16 the failure is not gradual. Its largest value is 65,504, so any channel above
# $\sqrt{65504} \approx 256$ squares to infinity, the mean becomes infinite, and the token normalises to zero.
# The real model has such channels:

# %%
with torch.no_grad():
    worst = max(norms, key=lambda name: captured[name][0].abs().max())
    squares_fp16 = captured[worst][0].half().pow(2).mean(-1)
overflowed = int((~torch.isfinite(squares_fp16)).sum())
print(
    f"{worst}: {overflowed} of {squares_fp16.numel()} tokens overflow float16 without the upcast"
)

# %% [markdown]
# ## Summary
#
# - RMSNorm is $w \odot x / \operatorname{RMS}(x)$: LayerNorm without the mean and the bias, one reduction per
#   token.
# - minqwen's `rms_norm` is HF's arithmetic step for step, so its outputs are bit-identical, not merely close;
#   the same formula written with `sqrt` and a division is a few ulps away.
# - The squares and their mean are computed in float32 even in a bf16 model: that bounds a norm's error by
#   about $2^{-7}$, and computing them in bf16 instead makes the median error larger.
# - Real hidden states reach hundreds to thousands in a few channels, so in float16 without the upcast the
#   squares overflow and tokens normalise to zero.
#
# ## Exercises
#
# ````{exercise}
# :label: rmsnorm-scale
# RMSNorm ignores the scale of its input: $\operatorname{RMSNorm}(cx) = \operatorname{RMSNorm}(x)$ for any
# $c > 0$, up to rounding. Check it on a real hidden state for $c = 10^3$, then find a small $c$ at which it
# visibly fails. Which term of the formula is responsible?
# ````
#
# ```{solution-start} rmsnorm-scale
# :class: dropdown
# ```

# %%
x, weight = captured["layer 12"][0].float(), norms["layer 12"].weight.float()
reference = rms_norm(x, weight, config.rms_norm_eps)
for c in (1e3, 1e-3, 1e-4, 1e-5):
    error = diff_stats(rms_norm(c * x, weight, config.rms_norm_eps), reference)[
        "max_rel"
    ]
    print(f"c = {c:.0e}: max relative change {error:.1e}")
assert (
    diff_stats(rms_norm(1e3 * x, weight, config.rms_norm_eps), reference)["max_rel"]
    < 1e-5
)
assert (
    diff_stats(rms_norm(1e-5 * x, weight, config.rms_norm_eps), reference)["max_rel"]
    > 1e-2
)

# %% [markdown]
# Scaling $x$ by $c$ scales $\operatorname{RMS}(x)$ by $c$ as long as $\varepsilon$ is negligible beside the mean
# of squares, and the two cancel. Once $c^2 \cdot \operatorname{mean}(x^2)$ comes near $\varepsilon = 10^{-6}$,
# the $\varepsilon$ term dominates and the output shrinks with $c$.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: rmsnorm-fold
# A fast engine (chapter 5) folds the norm's weight into the matrix that follows it. Show that
# $W\,(w \odot \hat x) = (W \operatorname{diag}(w))\,\hat x$ on the real first layer: normalising with a weight of
# ones, then multiplying by `q_proj`'s weight scaled column by column by $w$, gives `q_proj(input_layernorm(x))`
# to float32 rounding.
# ````
#
# ```{solution-start} rmsnorm-fold
# :class: dropdown
# ```

# %%
layer = hf.model.layers[0]
x = captured["layer 0"][0].float()
with torch.no_grad():
    unfused = layer.self_attn.q_proj.float()(layer.input_layernorm.float()(x))
    normed = rms_norm(
        x, torch.ones_like(layer.input_layernorm.weight), config.rms_norm_eps
    )
    folded_weight = (
        layer.self_attn.q_proj.weight * layer.input_layernorm.weight[None, :]
    )
    fused = torch.nn.functional.linear(
        normed, folded_weight, layer.self_attn.q_proj.bias
    )
    layer.to(DTYPE)
print(f"max relative difference: {diff_stats(fused, unfused)['max_rel']:.1e}")
assert diff_stats(fused, unfused)["max_rel"] <= tolerance("forward")

# %% [markdown]
# Multiplying by $\operatorname{diag}(w)$ before the matrix or scaling the matrix's columns by $w$ is the same
# product, grouped differently; the two differ by float32 rounding only. The folded weight is computed once at
# load time, and each decode step saves one pass over the hidden vector.
#
# ```{solution-end}
# ```
