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
# # The layer probe
#
# When minqwen's {term}`logits` disagree with HF's, the logits alone do not say why: an error in layer 3 reaches
# every layer after it. How do we find the module where a disagreement starts? This page builds the tool the rest
# of the book uses for that, `minqwen.tools.probe`, and plants a fault for it to find.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - to **record and replay**: save the exact inputs and output of chosen HF modules through forward hooks, feed
#   the inputs to minqwen's module and diff the outputs, so each module is judged on HF's own inputs;
# - to **compare layers**: run both models on the same tokens and diff what each layer hands to the next;
# - what "equal", "a few {term}`ulps <ulp>` apart" and "wrong" look like, and how a swapped pair of weights in one
#   layer shows up.
#
# **You need** the module tree from {doc}`01_architecture` and the name map from {doc}`02_weight_map`. Running
# it loads the embedded model twice, HF's and minqwen's (about a minute on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import layer_probe as figures
from helpers import (
    DEVICE,
    DTYPE,
    hf_model,
    model_path,
    show_source,
    tokenizer,
    tolerance,
)

import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display
from safetensors import safe_open

import minqwen
from minqwen.tools import probe

torch.manual_seed(0)
hf = hf_model()
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
tok = tokenizer()
layers = ours.config.num_hidden_layers
exact_arithmetic = DTYPE == torch.float32 and DEVICE == "cpu"

# %% [markdown]
# ## Recording
#
# `record` registers two hooks on each named module: a pre-hook that saves what the module is called with and a
# forward hook that saves what it returns. `with_kwargs=True` matters: HF passes most of a decoder layer's inputs
# by keyword, among them `position_embeddings`, the (cos, sin) tuple of {term}`RoPE`. Tensors go into a
# {term}`safetensors` file; the structure around them (tuples, None, booleans, a KV cache's fill level) goes into
# its metadata.

# %%
show_source(probe.record)

# %% [markdown]
# We record the embedding, every decoder layer, the parts of layer 0, the final norm and the LM head, all in one
# HF forward on one prompt.

# %%
prompt = 'def fibonacci(n):\n    """Return the nth Fibonacci number."""\n'
ids = tok(prompt, return_tensors="pt").input_ids.to(DEVICE)
parts = ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"]
recorded = [
    "model.embed_tokens",
    *[f"model.layers.0.{part}" for part in parts],
    *[f"model.layers.{i}" for i in range(layers)],
    "model.norm",
    "lm_head",
]
workdir = Path(tempfile.mkdtemp())
recording = probe.record(
    hf, recorded, workdir / "probe.safetensors", ids, use_cache=False
)
size = recording.stat().st_size / 2**20
print(f"{ids.shape[1]} tokens, {len(recorded)} modules recorded, {size:.1f} MiB")

# %% [markdown]
# What the file holds for decoder layer 0: the hidden states came positionally, the rest by keyword. The mask is
# None because the batch has no padding, so attention is plainly causal.

# %% tags=["hide-input"]
with safe_open(recording, framework="pt") as f:
    meta = json.loads(f.metadata()["probe"])
    shapes = {
        k: {
            "shape": tuple(f.get_slice(k).get_shape()),
            "dtype": f.get_slice(k).get_dtype(),
        }
        for k in f.keys()
        if k.startswith("model.layers.0/")
    }
display(pd.DataFrame(shapes).T)
print(json.dumps(meta["modules"]["model.layers.0"]["kwargs"], indent=1))

# %% [markdown]
# ## Replaying
#
# The two libraries call a decoder layer differently:
#
# | | HF `Qwen2DecoderLayer` | minqwen `DecoderLayer` |
# |---|---|---|
# | arguments | `hidden_states`, and by keyword `attention_mask`, `position_ids`, `past_key_values`, `use_cache`, `position_embeddings=(cos, sin)` | `(x, cos, sin, mask, cache)` |
# | mask | None (causal), boolean, or additive (0 = may attend) | None (causal) or boolean |
# | returns | the hidden states (attention: `(output, weights)`) | the hidden states |
#
# so the replay has one small adapter per kind of module that says explicitly which recorded input goes where.
# Here is the decoder layer's, and the loop that runs them:

# %%
show_source(probe._replay_decoder_layer)
show_source(probe.replay)

# %% [markdown]
# Replaying every recorded module on minqwen gives one row per module, each computed from HF's own inputs:

# %%
rows = probe.replay(recording, ours)
identical = sum(r.max_abs == 0 for r in rows)
worst = max(r.max_rel for r in rows)
print(f"{identical}/{len(rows)} modules bit-identical, max |Δ| / max |HF| {worst:.1e}")
assert worst <= tolerance("elementwise")
if exact_arithmetic:
    assert identical == len(rows)

# %% tags=["remove-input", "hide-output"]
figures.diff_frame(rows)

# %% [markdown]
# In float32 on a CPU every module agrees with HF to the last bit, not merely closely: minqwen performs the same
# operations in the same order, so every rounding happens alike. (In {term}`bfloat16 <bf16>` or on a GPU the kernels may round
# differently, and the check above is a tolerance, not an equality.)
#
# ## Equal, close, or wrong: the ulp
#
# When two results are not bit-identical, how far apart is "the same up to rounding"? A float32 number has 24
# significant bits, so the gap between $x$ and the next representable number, one **unit in the last place**
# ({term}`ulp`), is
#
# $$
# \operatorname{ulp}(x) = 2^{\lfloor \log_2 |x| \rfloor - 23},
# \qquad
# 2^{-24}|x| < \operatorname{ulp}(x) \le 2^{-23}|x| \approx 1.2 \times 10^{-7}\,|x|.
# $$
#
# Every float32 operation rounds its result to the nearest representable number, an error of at most half an ulp.
# Two computations that add the same numbers in a different order can therefore differ by a few ulps, which is a
# relative difference of a few times $10^{-7}$. `torch.nextafter` steps to the neighbouring float:

# %%
for x in (1.0, 3.0, 1000.0):
    t = torch.tensor(x)
    ulp = (torch.nextafter(t, torch.tensor(float("inf"))) - t).item()
    print(f"ulp({x:g}) = {ulp:.3e} = {ulp / x:.2e} x {x:g}")
assert (torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)) - 1).item() == 2**-23

# %% [markdown]
# The book's float32 tolerance for a whole forward pass, `tolerance("forward")`, is $10^{-5}$ relative to the
# largest value: roughly a hundred ulps, room for rounding that compounds over 24 layers, and far below what a
# real mistake produces, as the planted fault below shows. In bfloat16, with 8 significant bits,
# one ulp is up to $2^{-7}$ of a value and the tolerance grows to match.
#
# ## Comparing whole forwards
#
# `compare_layers` runs both models end to end and diffs what each layer hands to the next. A padded batch makes
# it harder: three prompts of different lengths, left-padded. Only real tokens are compared; what a padding
# position computes is never used.

# %%
show_source(probe.compare_layers)

# %%
prompts = [prompt, "量子计算机是如何工作的？", "Write a haiku about tensors."]
batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(DEVICE)
clean = probe.compare_layers(hf, ours, batch.input_ids, batch.attention_mask)
real = int(batch.attention_mask.sum())
print(f"batch {tuple(batch.input_ids.shape)}, {real} real tokens, {len(clean)} rows")
assert probe.first_divergence(clean, tolerance("forward")) is None

# %% tags=["nbval-ignore-output"]
identical = sum(r.max_abs == 0 for r in clean)
worst = max(r.max_rel for r in clean)
print(f"{identical}/{len(clean)} rows bit-identical, max |Δ| / max |HF| {worst:.1e}")
print(f"every row within {tolerance('forward'):.0e} relative")

# %% tags=["remove-input", "hide-output", "nbval-ignore-output"]
figures.diff_frame(clean)

# %% [markdown]
# On the CPU that executed this page every row is exact. On another CPU the digits may change, since minqwen
# builds its padded mask itself and the kernels may order sums differently, so the book asserts the bound, not the
# digits (the full table is folded above).
#
# ## Finding a fault
#
# Now a deliberate fault of the kind a hand-written loader makes: layer 13 of minqwen gets its key and value
# projections swapped (imagine a name map that mixed up `k_proj` and `v_proj`). With 2 key-value heads of 64
# channels they have the same shape, so no shape check catches it. The logits are wrong; the question is where
# it starts.


# %%
def swap_key_value(attention) -> None:
    with torch.no_grad():
        for part in ("weight", "bias"):
            key = getattr(attention.k_proj, part)
            value = getattr(attention.v_proj, part)
            key_before = key.clone()
            key.copy_(value)
            value.copy_(key_before)


broken_layer = 13
swap_key_value(ours.layers[broken_layer].self_attn)
broken = probe.compare_layers(hf, ours, batch.input_ids, batch.attention_mask)
replayed_broken = probe.replay(recording, ours)
swap_key_value(ours.layers[broken_layer].self_attn)  # swapped back

first = probe.first_divergence(broken, tolerance("forward"))
print("first divergence (whole forward):", first.minqwen)

# %% [markdown]
# Both probes around the first divergence, each row the relative error max |Δ| / max |HF| of one decoder layer's
# output (the full table is folded below). The whole forward is exact up to
# layer 12 and wrong from layer 13 on: each later layer receives minqwen's wrong input. The replay, which feeds
# every layer HF's recorded input, is sharper still: only layer 13 is wrong, since the layers after it get
# correct inputs and compute correct outputs.

# %% tags=["hide-input", "nbval-ignore-output"]
table = figures.fault_table(
    broken, replayed_broken, tolerance("forward"), tolerance("elementwise")
)
at = table.index.get_loc(first.minqwen)
table.iloc[at - 2 : at + 3]

# %% tags=["remove-input", "hide-output", "nbval-ignore-output"]
table

# %%
over = [r.minqwen for r in broken if r.max_rel > tolerance("forward")]
replay_over = [
    r.minqwen for r in replayed_broken if r.max_rel > tolerance("elementwise")
]
print(f"over tolerance (whole forward): {over[0]} to {over[-1]}, {len(over)} rows")
print(f"over tolerance (replay): {replay_over}")
assert first.minqwen == f"layers.{broken_layer}"
assert over == [r.minqwen for r in broken[broken.index(first) :]]
assert replay_over == [f"layers.{broken_layer}"]

# %% [markdown]
# Drawn per module, the two probes tell the story at a glance: the whole-forward error jumps at layer 13 and stays
# (it even grows as later layers amplify it), the replay error jumps at layer 13 alone.

# %% tags=["hide-input"]
figures.fault_plot(broken, replayed_broken, broken_layer, tolerance("forward"))

# %% [markdown]
# Later chapters call `probe.compare_layers` whenever a number disagrees, and `probe.record`/`probe.replay` when a
# single module is in doubt.
#
# ## Summary
#
# - `probe.record` saves what chosen HF modules receive and return (positional and keyword inputs, through
#   forward hooks) to a safetensors file; `probe.replay` feeds those inputs to minqwen's modules and diffs.
# - In float32 on a CPU, every module and every layer of minqwen is bit-identical to HF's, even on a padded batch.
# - An ulp is the gap to the next float: at most $1.2 \times 10^{-7}$ of the value in float32. Rounding differences are
#   a few ulps; the forward tolerance of $10^{-5}$ allows about a hundred; a real fault is far above it.
# - `compare_layers` with `first_divergence` names the first layer that goes wrong; replay isolates the faulty
#   layer alone, because every layer gets HF's inputs.
#
# ## Exercises
#
# ````{exercise}
# :label: layer-probe-mlp
# Plant a different fault: a name map that mixed up `gate_proj` and `up_proj` in layer 5. The two have the same
# shape, so the loader would accept them. Find the layer with `compare_layers` and `first_divergence`, then swap
# them back and check that the model is clean again.
# ````
#
# ```{solution-start} layer-probe-mlp
# :class: dropdown
# ```


# %%
def swap_gate_up(mlp) -> None:
    with torch.no_grad():
        gate_before = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight.copy_(mlp.up_proj.weight)
        mlp.up_proj.weight.copy_(gate_before)


swap_gate_up(ours.layers[5].mlp)
faulty = probe.compare_layers(hf, ours, batch.input_ids, batch.attention_mask)
swap_gate_up(ours.layers[5].mlp)  # swapped back
found = probe.first_divergence(faulty, tolerance("forward"))
print(f"first divergence: {found.minqwen}")
assert found.minqwen == "layers.5"
restored = probe.compare_layers(hf, ours, batch.input_ids, batch.attention_mask)
assert probe.first_divergence(restored, tolerance("forward")) is None

# %% [markdown]
# With the two swapped, layer 5's MLP computes $W_\text{down}(\operatorname{silu}(W_\text{up} x) \odot W_\text{gate}
# x)$ instead of $W_\text{down}(\operatorname{silu}(W_\text{gate} x) \odot W_\text{up} x)$: the activation is
# applied to the wrong branch, so the first row over tolerance is `layers.5`. The embedding and layers 0 to 4
# stay exact, because they never see layer 5's weights.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: layer-probe-ulps
# RMSNorm's first step is a sum of squares. Add up the squares of one token's hidden state (layer 0's recorded
# output) in float32, once forwards and once backwards, one addition at a time. How many ulps apart are the two
# sums, and how far is each from the sum computed in float64?
# ````
#
# ```{solution-start} layer-probe-ulps
# :class: dropdown
# ```

# %%
with safe_open(recording, framework="pt") as f:
    squares = f.get_tensor("model.layers.0/output")[0, -1].float().pow(2)


def sequential_sum(values) -> torch.Tensor:
    total = torch.tensor(0.0)
    for v in values:
        total = total + v  # one float32 rounding per addition
    return total


forwards, backwards = sequential_sum(squares), sequential_sum(squares.flip(0))
exact = squares.double().sum()
ulp = (torch.nextafter(forwards, torch.tensor(float("inf"))) - forwards).item()
print(f"forwards {forwards.item():.9g}, backwards {backwards.item():.9g}")
print(f"apart: {abs(forwards - backwards).item() / ulp:.0f} ulps")
for name, total in (("forwards", forwards), ("backwards", backwards)):
    error = abs(total.double() - exact).item()
    print(f"{name}: {error / ulp:.1f} ulps from float64")
    # the textbook bound for n additions: (n - 1) half-ulps of the running sum
    assert error <= (len(squares) - 1) * 2**-24 * exact.item()

# %% [markdown]
# Each of the additions rounds to the nearest float, so the two orders accumulate different rounding errors, a
# few ulps of the result; neither order is exact, and both stay far inside the worst case of one half-ulp per
# addition. This is why the book compares computations that order their sums differently with a tolerance, and
# demands bit-identity only where the operations are the same.
#
# ```{solution-end}
# ```
