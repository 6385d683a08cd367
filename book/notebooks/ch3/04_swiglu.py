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
# After attention, each token goes through the MLP on its own. Qwen2's MLP is **SwiGLU**: two parallel
# projections up to 4,864 channels, one passed through SiLU and used as a gate on the other, then one projection
# back down to 896:
#
# `mlp(x) = down( silu(gate(x)) * up(x) )`, with `silu(z) = z * sigmoid(z)`.
#
# Compared with a plain `down(relu(up(x)))`, the gate lets the model choose per channel, per token, how much of
# `up(x)` passes. It costs a third projection; in exchange, the MLPs hold two thirds of the model's non-embedding
# weights.

# %%
# %matplotlib inline
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

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from minqwen.config import ModelConfig
from minqwen.layers import MLP

hf_logging.disable_progress_bar()
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_pretrained(model_path(), dtype=DTYPE).to(DEVICE).eval()
config = ModelConfig.from_file(model_path())
show_source(MLP)

# %% [markdown]
# SiLU is smooth and, unlike ReLU, lets small negative values through (its minimum is about -0.28 at z = -1.28):

# %%
z = torch.linspace(-6, 4, 500)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(z, F.silu(z), label="silu(z) = z sigmoid(z)")
ax.plot(z, F.relu(z), ls="--", label="relu(z)")
ax.axhline(0, color="gray", lw=0.5)
ax.set(xlabel="z", title="the gate's activation")
ax.legend()
plt.show()

# %% [markdown]
# ## Real inputs, captured from HF
#
# Hooks on three layers' `mlp` record what the MLP received and returned while HF ran a prompt.

# %%
prompt = "import numpy as np\n\ndef softmax(x):\n    e = np.exp(x - x.max())\n    return e / e.sum()"
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
# The hand version spells out every step with plain tensor operations; minqwen's `MLP` is given the same layer's
# weights. Both are compared with what HF's `Qwen2MLP` returned.


# %%
def swiglu_by_hand(x, gate_weight, up_weight, down_weight):
    gate = x @ gate_weight.T
    up = x @ up_weight.T
    hidden = gate * torch.sigmoid(gate) * up
    return hidden @ down_weight.T


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
diff_table(rows)

# %% [markdown]
# minqwen's `MLP` runs the same operations as HF's in the same order: bit-identical. The hand version writes
# `z * sigmoid(z)` instead of the fused `silu` kernel, which rounds differently in the last bit; that is all.

# %%
for i in layers:
    assert torch.equal(*rows[f"layer {i}: minqwen MLP"])
    assert diff_stats(*rows[f"layer {i}: by hand"])["max_rel"] <= tolerance(
        "elementwise"
    )

# %% [markdown]
# ## What the gate does
#
# Left: the gate's pre-activations in the middle layer; SiLU passes the positive ones almost unchanged and
# squashes the negative ones towards zero. Right: the product `silu(gate) * up` that reaches `down_proj`, on a log
# scale: a sharp peak at zero and long tails, so each token leans on a minority of the 4,864 channels.

# %%
middle = layers[1]
with torch.no_grad():
    x = captured[middle][0]
    mlp = ours_mlps[middle]
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    product = F.silu(gate) * up
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.hist(gate.flatten().float().cpu(), bins=200, range=(-8, 4))
left.set(xlabel="gate(x)", title=f"layer {middle}: gate pre-activations")
right.hist(product.flatten().float().cpu(), bins=200, range=(-1, 1), log=True)
right.set(xlabel="silu(gate) * up", title="what reaches down_proj")
plt.show()
negative = (gate < 0).float().mean().item()
small = (
    (product.abs() < 0.01 * product.abs().amax(-1, keepdim=True)).float().mean().item()
)
print(
    f"gate pre-activations below zero: {negative:.2f}; products below 1% of the token's largest: {small:.2f}"
)

# %% [markdown]
# ## Precision: no upcast here
#
# Unlike RMSNorm (next chapter), the MLP has no float32 step in HF's code: in bf16, `gate`, `up`, `silu` and the
# product are each rounded to bf16, and only the matmuls accumulate in float32 inside the kernel. Measured
# against a float64 reference on the same inputs, that costs a few parts in a thousand, the size of bf16's own
# rounding (2^-8 = 3.9e-3 relative), and an upcast of the elementwise part buys little, because the rounding of
# the matmul outputs is still there.


# %%
def bf16_mlp(x, mlp, upcast_gate: bool):
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if upcast_gate:
        return mlp.down_proj((F.silu(gate.float()) * up.float()).to(x.dtype))
    return mlp.down_proj(F.silu(gate) * up)


precision = {}
with torch.no_grad():
    for i in layers:
        mlp_bf16 = MLP(config).to(DEVICE)
        mlp_bf16.load_state_dict(hf.model.layers[i].mlp.state_dict())
        mlp_bf16 = mlp_bf16.bfloat16()
        x16 = captured[i][0].bfloat16()
        # float64 arithmetic on the very same bf16 inputs and weights: what is left is the arithmetic's error
        weights64 = (
            p.double()
            for p in (
                mlp_bf16.gate_proj.weight,
                mlp_bf16.up_proj.weight,
                mlp_bf16.down_proj.weight,
            )
        )
        exact = swiglu_by_hand(x16.double(), *weights64)
        precision[f"layer {i}"] = {
            "bf16 as HF runs it": diff_stats(bf16_mlp(x16, mlp_bf16, False), exact)[
                "max_rel"
            ],
            "bf16, silu*up in fp32": diff_stats(bf16_mlp(x16, mlp_bf16, True), exact)[
                "max_rel"
            ],
        }
precision_table = pd.DataFrame(precision).T
precision_table.map(lambda v: f"{v:.2e}")

# %%
assert all(1e-4 < v < 2e-2 for row in precision.values() for v in row.values())
