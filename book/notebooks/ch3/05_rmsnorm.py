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
# Every decoder layer normalises its input twice (before attention, before the MLP), and the model normalises
# once more before the LM head. Qwen2 uses **RMSNorm**: divide each token's vector by its root mean square, then
# scale each channel by a learned weight:
#
# `rmsnorm(x) = weight * x / sqrt(mean(x^2) + eps)`, with `eps = 1e-6`.
#
# No mean is subtracted and there is no bias, unlike LayerNorm. The one subtlety is precision: the mean of
# squares is taken in float32 even when the model runs in bf16 or fp16. This chapter shows where that happens and
# measures what it buys.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from minqwen.config import ModelConfig
from minqwen.layers import RMSNorm, rms_norm

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

hf_logging.disable_progress_bar()
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_pretrained(model_path(), dtype=DTYPE).to(DEVICE).eval()
config = ModelConfig.from_file(model_path())
print(f"rms_norm_eps = {config.rms_norm_eps!r} (1e-6 stored through float32)")
show_source(rms_norm)
show_source(RMSNorm)

# %% [markdown]
# ## Real inputs
#
# Hooks on every `input_layernorm` and on the final `norm` record their inputs and outputs while HF runs a prompt.
# The hidden states grow through the layers, and a few channels grow far more than the rest: these are the
# "massive activations" many LLMs develop.

# %%
prompt = "SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name;"
ids = tokenizer()(prompt, return_tensors="pt").input_ids.to(DEVICE)
norms = {
    f"layers.{i}.input_layernorm": hf.model.layers[i].input_layernorm
    for i in range(config.num_hidden_layers)
}
norms["norm"] = hf.model.norm
captured = {}
handles = [
    m.register_forward_hook(
        lambda m, args, out, n=n: captured.update({n: (args[0], out)})
    )
    for n, m in norms.items()
]
with torch.no_grad():
    hf(ids)
for handle in handles:
    handle.remove()

rms = [captured[n][0].float().pow(2).mean(-1).sqrt().median().item() for n in norms]
peak = [captured[n][0].float().abs().max().item() for n in norms]
fig, ax = plt.subplots()
ax.semilogy(rms, marker=".", label="median RMS over tokens")
ax.semilogy(peak, marker=".", label="max |x|")
ax.axhline(256, color="gray", ls="--", label="256: x^2 overflows fp16 above this")
ax.set(
    xlabel="norm (0-23: layer inputs, 24: final norm)",
    ylabel="magnitude",
    title="inputs to RMSNorm",
)
ax.legend()
plt.show()
print(f"largest input: {max(peak):.0f} at {list(norms)[peak.index(max(peak))]}")

# %% [markdown]
# ## By hand, and with minqwen's `RMSNorm`


# %%
def rmsnorm_by_hand(x, weight, eps):
    x32 = x.float()
    return weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(
        x.dtype
    )


rows = {}
with torch.no_grad():
    for name in (
        "layers.0.input_layernorm",
        f"layers.{config.num_hidden_layers // 2}.input_layernorm",
        "norm",
    ):
        x, hf_out = captured[name]
        ours = RMSNorm(config.hidden_size, config.rms_norm_eps).to(
            device=DEVICE, dtype=DTYPE
        )
        ours.load_state_dict(norms[name].state_dict())
        rows[f"{name}: minqwen RMSNorm"] = (ours(x), hf_out)
        rows[f"{name}: by hand"] = (
            rmsnorm_by_hand(x, norms[name].weight, config.rms_norm_eps),
            hf_out,
        )
diff_table(rows)

# %% [markdown]
# minqwen's `RMSNorm` is HF's arithmetic, bit for bit (`rsqrt` of the mean). The hand version divides by `sqrt`
# instead, one more rounding: a few float32 ulps apart.

# %%
for name, (a, b) in rows.items():
    if "minqwen" in name:
        assert torch.equal(a, b), name
    else:
        assert diff_stats(a, b)["max_rel"] <= tolerance("elementwise"), name

# %% [markdown]
# ## Where the upcast happens, and what it buys
#
# In minqwen's `RMSNorm.forward` (and HF's), `x.float()` comes first: the squares, their mean, `rsqrt` and the
# scaling of `x` all run in float32; the result is cast back to the working dtype, and only then multiplied by
# the weight. Without the upcast, everything runs in bf16 (8 bits of mantissa): each square, the mean, and the
# reciprocal root are rounded to about 3 significant digits.
#
# We measure both against a float64 reference, on the real hidden states of every layer rounded to bf16 (so the
# inputs are the same for all three and only the arithmetic differs).


# %%
def rmsnorm_without_upcast(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


results = {}
with torch.no_grad():
    for name, module in norms.items():
        x16 = captured[name][0].bfloat16()
        weight16 = module.weight.bfloat16()
        x64 = x16.double()
        exact = (
            weight16.double()
            * x64
            * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
        )
        norm16 = RMSNorm(config.hidden_size, config.rms_norm_eps).to(DEVICE).bfloat16()
        norm16.weight.copy_(weight16)
        results[name] = {
            "bf16 with upcast (minqwen, HF)": diff_stats(norm16(x16), exact)["max_rel"],
            "bf16 without upcast": diff_stats(
                rmsnorm_without_upcast(x16, weight16, config.rms_norm_eps), exact
            )["max_rel"],
            "fp16 without upcast": diff_stats(
                rmsnorm_without_upcast(
                    x16.half(), weight16.half(), config.rms_norm_eps
                ),
                exact,
            )["max_rel"],
        }
precision = pd.DataFrame(results).T
summary = precision.agg(["median", "max"])
summary.map(lambda v: f"{v:.2e}")

# %%
fig, ax = plt.subplots()
for column in precision:
    ax.semilogy(
        range(len(precision)),
        precision[column].clip(upper=1e3),
        marker=".",
        label=column,
    )
ax.set(
    xlabel="norm (0-23: layer inputs, 24: final norm)",
    ylabel="max |error| / max |exact|",
    title="RMSNorm in half precision against float64",
)
ax.legend()
plt.show()

# %% [markdown]
# With the upcast, what is left is two roundings to bf16: the normalised `x`, then its product with the weight.
# bf16 keeps 8 significant bits, so each rounding costs at most 2^-8 = 3.9e-3 of the value, and the two together
# at most 2^-7. Without the upcast, the squares, their mean and the reciprocal root are rounded too, and the errors
# add up. In fp16 the failure is not gradual: any channel above 256 squares to more than fp16's maximum, 65,504,
# the mean becomes infinite and the token normalises to zero (or NaN). Whatever the inputs, that is why the
# upcast stays.

# %%
assert summary.loc["max", "bf16 with upcast (minqwen, HF)"] <= 2**-7
assert (
    summary.loc["median", "bf16 without upcast"]
    > summary.loc["median", "bf16 with upcast (minqwen, HF)"]
)
with torch.no_grad():
    worst = max(norms, key=lambda n: captured[n][0].abs().max())
    x_half = captured[worst][0].half()
    overflowed = ~torch.isfinite(x_half.pow(2).mean(-1))
print(
    f"{worst}: {int(overflowed.sum())} of {overflowed.numel()} tokens overflow fp16 without the upcast"
)
