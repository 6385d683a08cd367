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
# # The SwiGLU MLP
#
# After attention, each token goes through the MLP on its own, with no look at the other tokens. Qwen2's MLP is
# a gated one: two parallel projections up to a wide hidden layer, one of them passed through SiLU and used as a
# gate on the other, then one projection back down. What does the gate compute, what does it do on the model's
# real hidden states, and does minqwen's MLP give HF's numbers to the last bit?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the {term}`SwiGLU` formula, $W_\text{down}(\operatorname{silu}(W_\text{gate}x) \odot W_\text{up}x)$, and
#   how SiLU differs from ReLU;
# - what the gate does on real hidden states: most channels are nearly closed, yet none exactly;
# - that minqwen's `MLP` is HF's bit for bit, and what {term}`bf16` costs in it.
#
# **You need** the layout of a decoder layer from {doc}`../ch2/01_architecture`, and the idea of a relative
# error from {doc}`../ch2/03_layer_probe`. Running it takes the embedded model (under a minute on a laptop
# CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import swiglu as figures
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
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from minqwen.model.config import ModelConfig
from minqwen.model.layers import MLP

torch.manual_seed(0)
hf = AutoModelForCausalLM.from_pretrained(model_path(), dtype=DTYPE).to(DEVICE).eval()
config = ModelConfig.from_file(model_path())

# %% [markdown]
# ## What it computes
#
# A plain transformer MLP is $W_2\,\operatorname{relu}(W_1 x)$: up to a wider space, a nonlinearity, back down.
# A gated linear unit projects up *twice*: one projection, through an activation, decides per channel how much
# of the other passes. With SiLU as the activation it is SwiGLU:
#
# $$
# \operatorname{MLP}(x) = W_\text{down}\big(\operatorname{silu}(W_\text{gate}\,x) \odot W_\text{up}\,x\big),
# \qquad
# \operatorname{silu}(z) = z\,\sigma(z) = \frac{z}{1 + e^{-z}}.
# $$
#
# $W_\text{gate}$ and $W_\text{up}$ map the hidden size to the intermediate size, $W_\text{down}$ maps it back;
# none has a bias. In minqwen's `MLP` the one line of `forward` is the formula, with `F.silu` for
# $\operatorname{silu}$ and `*` for $\odot$:

# %%
show_source(MLP)

# %%
layer_params = sum(p.numel() for p in hf.model.layers.parameters())
mlp_params = sum(p.numel() for layer in hf.model.layers for p in layer.mlp.parameters())
print(
    f"{config.hidden_size} -> {config.intermediate_size} -> {config.hidden_size}; "
    f"the MLPs hold {mlp_params / 1e6:.0f}M of the decoder layers' "
    f"{layer_params / 1e6:.0f}M parameters ({mlp_params / layer_params:.0%})"
)

# %% [markdown]
# The MLPs are most of the layers' weights: attention's keys and values are small under {term}`GQA`, while each
# MLP has three matrices of hidden by intermediate size.
#
# ## SiLU, and what the gate does
#
# $\operatorname{silu}(z) = z\,\sigma(z)$ scales $z$ by $\sigma(z)$, the share of it that passes: nearly all of a
# large positive $z$, nearly none of a large negative one. Unlike ReLU it is smooth and lets small negative values
# through; its minimum is where the derivative $\sigma(z)\,(1 + z(1 - \sigma(z)))$ vanishes:

# %%
z = torch.linspace(-3, 0, 300_001, dtype=torch.float64)
at = int(F.silu(z).argmin())
minimum = (z[at].item(), F.silu(z)[at].item())
print(f"silu's minimum: {minimum[1]:.4f} at z = {minimum[0]:.4f}")
assert abs(minimum[0] + 1.2785) < 1e-3

# %% [markdown]
# Left, the two activations. Right, the gate's effect on one channel $i$: what passes to $W_\text{down}$ is
# $\operatorname{silu}(g)\,u$, with $g$ the channel's gate pre-activation and $u$ its up value. When $g$ is
# negative the channel is closed, whatever $u$; when $g$ is positive the channel passes $u$ scaled by about $g$.
# The product of two projections of the same $x$ is what makes the unit more than a ReLU: the output is quadratic
# in $x$ where the gate is open.

# %% tags=["hide-input"]
figures.activations(minimum)

# %% [markdown]
# ## Real inputs, captured from HF
#
# Hooks on three layers' `mlp` record what the MLP received and returned while HF ran a prompt.

# %% tags=["hide-input"]
prompt = (
    "import numpy as np\n\ndef softmax(x):\n"
    "    e = np.exp(x - x.max())\n    return e / e.sum()"
)
ids = tokenizer()(prompt, return_tensors="pt").input_ids.to(DEVICE)
layers = [0, config.num_hidden_layers // 2, config.num_hidden_layers - 1]
captured = {}
handles = [
    hf.model.layers[i].mlp.register_forward_hook(
        lambda m, args, out, i=i: captured.update({i: (args[0], out)})
    )
    for i in layers
]
with torch.no_grad():
    hf(ids)
for handle in handles:
    handle.remove()
print(
    f"{ids.shape[1]} tokens, layers {layers}, MLP input {tuple(captured[0][0].shape)}"
)

# %% [markdown]
# ## By hand, and with minqwen's `MLP`
#
# The version by hand spells the formula out with plain tensor operations, $z\,\sigma(z)$ written as
# `gate * torch.sigmoid(gate)`. minqwen's `MLP` is given the same layer's weights. Both are compared with what
# HF's `Qwen2MLP` returned.


# %%
def swiglu_by_hand(x, gate_weight, up_weight, down_weight):
    gate = x @ gate_weight.T
    up = x @ up_weight.T
    hidden = gate * torch.sigmoid(gate) * up  # silu(gate) ⊙ up
    return hidden @ down_weight.T


# %% tags=["hide-input"]
rows, ours_mlps = {}, {}
with torch.no_grad():
    for i in layers:
        x, hf_out = captured[i]
        hf_mlp = hf.model.layers[i].mlp
        ours_mlps[i] = MLP(config).to(device=DEVICE, dtype=DTYPE)
        ours_mlps[i].load_state_dict(hf_mlp.state_dict())
        by_hand = swiglu_by_hand(
            x, hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight, hf_mlp.down_proj.weight
        )
        rows[f"layer {i}: minqwen MLP"] = (ours_mlps[i](x), hf_out)
        rows[f"layer {i}: by hand"] = (by_hand, hf_out)
identical = [i for i in layers if torch.equal(*rows[f"layer {i}: minqwen MLP"])]
by_hand_error = max(diff_stats(*rows[f"layer {i}: by hand"])["max_rel"] for i in layers)
print(f"minqwen's MLP: {len(identical)}/{len(layers)} layers bit-identical to HF's")
print(f"by hand: max relative error {by_hand_error:.1e}")
for i in layers:
    assert torch.equal(*rows[f"layer {i}: minqwen MLP"])
    assert diff_stats(*rows[f"layer {i}: by hand"])["max_rel"] <= tolerance(
        "elementwise"
    )

# %% tags=["remove-input", "hide-output"]
diff_table(rows)

# %% [markdown]
# minqwen's `MLP` runs the same operations as HF's in the same order, so its output is equal, not just close.
# The version by hand computes $z\,\sigma(z)$ in two operations where the fused `silu` kernel uses one, which
# rounds differently in the last bit; that is all. The table is folded above.
#
# ## The gate on real hidden states
#
# The three captured layers, through their own gate and up projections. Left, the gate pre-activations: most are
# negative, so most channels pass only a small share of their up value. Right, $|\operatorname{silu}(g)\,u|$ of
# every channel as a share of the token's largest, on a log scale: the values spread over orders of magnitude.
# The table below counts, per layer, the negative gates, the products under 1% of the token's largest, and how
# many of the channels hold half of a token's total $|\operatorname{silu}(g)\,u|$ (the median over tokens).

# %%
gates, products = {}, {}
with torch.no_grad():
    for i in layers:
        mlp = ours_mlps[i]
        x = captured[i][0]
        gates[f"layer {i}"] = mlp.gate_proj(x)
        products[f"layer {i}"] = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


# %% tags=["hide-input"]
def half_of_the_mass(product):
    """Median over tokens of how many of the largest |products| make half their sum."""
    ordered = product.abs().sort(-1, descending=True).values
    share = ordered.cumsum(-1) / ordered.sum(-1, keepdim=True)
    return (share < 0.5).sum(-1).float().median().item() + 1


figures.gate_statistics(gates, products)
shares = pd.DataFrame(
    {
        name: {
            "gate < 0": (gates[name] < 0).float().mean().item(),
            "product < 1% of the token's largest": (
                products[name].abs()
                < 0.01 * products[name].abs().amax(-1, keepdim=True)
            )
            .float()
            .mean()
            .item(),
            "channels holding half": half_of_the_mass(products[name]),
        }
        for name in gates
    }
).T
shares.map(lambda v: f"{v:.2f}" if v < 1 else f"{v:.0f} of {config.intermediate_size}")

# %% [markdown]
# ## Precision: no upcast here
#
# Unlike {doc}`RMSNorm <05_rmsnorm>`, the MLP has no float32 step in HF's code: in bf16, `gate`, `up`, `silu` and
# the product are each rounded to bf16, and only the matmuls accumulate in float32 inside the kernel. Measured
# against a float64 reference on the same bf16 inputs and weights, that costs a few parts in a thousand, the size
# of bf16's own rounding, $2^{-8} \approx 3.9 \times 10^{-3}$ relative. Computing `silu(gate) * up` in float32
# buys little, because the matmul outputs are still rounded to bf16.


# %%
def bf16_mlp(x, mlp, upcast_gate: bool):
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if upcast_gate:
        return mlp.down_proj((F.silu(gate.float()) * up.float()).to(x.dtype))
    return mlp.down_proj(F.silu(gate) * up)


# %% tags=["hide-input"]
precision = {}
with torch.no_grad():
    for i in layers:
        mlp_bf16 = MLP(config).to(DEVICE)
        mlp_bf16.load_state_dict(hf.model.layers[i].mlp.state_dict())
        mlp_bf16 = mlp_bf16.bfloat16()
        x16 = captured[i][0].bfloat16()
        # float64 on the same bf16 inputs and weights: what is left is arithmetic error
        projections = (mlp_bf16.gate_proj, mlp_bf16.up_proj, mlp_bf16.down_proj)
        exact = swiglu_by_hand(x16.double(), *(p.weight.double() for p in projections))
        precision[f"layer {i}"] = {
            "bf16 as HF runs it": diff_stats(bf16_mlp(x16, mlp_bf16, False), exact)[
                "max_rel"
            ],
            "bf16, silu*up in fp32": diff_stats(bf16_mlp(x16, mlp_bf16, True), exact)[
                "max_rel"
            ],
        }
assert all(1e-4 < v < 2e-2 for row in precision.values() for v in row.values())
pd.DataFrame(precision).T.map(lambda v: f"{v:.2e}")

# %% [markdown]
# ## Summary
#
# - Qwen2's MLP is $W_\text{down}(\operatorname{silu}(W_\text{gate}x) \odot W_\text{up}x)$: two projections up,
#   one of them gating the other channel by channel, one projection down, no biases.
# - $\operatorname{silu}(z) = z\,\sigma(z)$ is a smooth ReLU with a small negative dip; the gate closes a channel
#   when its pre-activation is negative.
# - The MLPs hold most of the decoder layers' parameters.
# - On real hidden states most gate pre-activations are negative, so most channels pass a small share of their
#   value; the products are skewed over orders of magnitude but not sparse: SiLU leaves no exact zeros.
# - minqwen's `MLP` is HF's bit for bit; in bf16 it is off by about bf16's own rounding, with or without a
#   float32 gate.
#
# ## Exercises
#
# ````{exercise}
# :label: swiglu-relu
# Replace SiLU by ReLU in the middle layer of HF's model (its `mlp.act_fn`) and measure how far the
# {term}`logits` of the prompt move, and how often the most likely next token changes. Then do the same in the
# first layer.
# ````
#
# ```{solution-start} swiglu-relu
# :class: dropdown
# ```


# %%
def logits_with_relu(layer):
    """The prompt's logits with silu replaced by relu in one layer of HF's model."""
    mlp = hf.model.layers[layer].mlp
    silu, mlp.act_fn = mlp.act_fn, torch.nn.ReLU()
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        mlp.act_fn = silu


with torch.no_grad():
    reference = hf(ids).logits
for layer in (layers[1], 0):
    moved = logits_with_relu(layer)
    stats = diff_stats(moved, reference)
    same_top = (moved.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(
        f"relu in layer {layer}: max |Δlogit| {stats['max_abs']:.2f} "
        f"({stats['max_rel']:.1%} of the largest); "
        f"same top token at {same_top:.0%} of positions"
    )
    assert stats["max_rel"] > tolerance("forward")
with torch.no_grad():
    assert torch.equal(hf(ids).logits, reference)  # the model is restored

# %% [markdown]
# ReLU zeroes what SiLU lets through below zero, and most gate pre-activations are negative: small changes per
# channel, but summed over thousands of channels and carried through the following layers. In either layer the
# logits move by a sizeable share of their largest value, far beyond rounding, and the top token changes at some
# positions (the lines above): the weights were trained with SiLU and fit it.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: swiglu-width
# SwiGLU has three matrices where a plain MLP has two. How wide would a plain ReLU MLP have to be to have as many
# parameters as Qwen2.5-0.5B's SwiGLU? Check your answer by building both with `torch.nn.Linear`.
# ````
#
# ```{solution-start} swiglu-width
# :class: dropdown
# ```

# %%
d, f = config.hidden_size, config.intermediate_size
plain_width = 3 * f // 2  # 3 d f = 2 d f'
swiglu = MLP(config)
plain = torch.nn.Sequential(
    torch.nn.Linear(d, plain_width, bias=False),
    torch.nn.ReLU(),
    torch.nn.Linear(plain_width, d, bias=False),
)
count = {
    name: sum(p.numel() for p in m.parameters())
    for name, m in (("swiglu", swiglu), ("plain", plain))
}
print(
    f"SwiGLU {f} wide: {count['swiglu']:,} parameters; "
    f"plain {plain_width} wide: {count['plain']:,}"
)
assert count["swiglu"] == count["plain"]

# %% [markdown]
# $3df = 2df'$ gives $f' = 1.5f$. This is why the SwiGLU paper, to compare at equal cost, shrinks the hidden
# layer to two thirds of a plain MLP's.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: swiglu-sparse
# A ReLU MLP has exact zeros, which a fast kernel can skip. Is SwiGLU's activity sparse enough to skip the small
# products anyway? In the middle layer, keep only each token's largest $|\operatorname{silu}(g)\,u|$, for 10%,
# 25% and 50% of the channels, set the others to zero before $W_\text{down}$, and measure how far each token's
# output moves.
# ````
#
# ```{solution-start} swiglu-sparse
# :class: dropdown
# ```

# %%
product = products[f"layer {layers[1]}"]
down = ours_mlps[layers[1]].down_proj
ordered = product.abs().sort(-1, descending=True).values
moved = {}
with torch.no_grad():
    full = down(product)
    for share in (0.10, 0.25, 0.50):
        k = int(share * config.intermediate_size)
        kept = product * (product.abs() >= ordered[..., k - 1 : k])
        change = (down(kept) - full).norm(dim=-1) / full.norm(dim=-1)
        moved[share] = change.median().item()
        print(
            f"keep the largest {share:.0%}: output moves by {moved[share]:.0%} (median)"
        )
assert moved[0.10] > moved[0.25] > moved[0.50] > 0

# %% [markdown]
# Even keeping half the channels, the output moves by a share that no inference engine would accept as rounding:
# SwiGLU's products are skewed, not sparse. Schemes that skip channels of such models first fine-tune them back
# towards ReLU, so that the skipped channels are exactly zero.
#
# ```{solution-end}
# ```
