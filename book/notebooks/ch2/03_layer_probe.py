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
# When minqwen's logits disagree with HF's, the logits alone do not say why: an error in layer 3 reaches every
# layer after it. This chapter builds the tool the rest of the book uses to find where a disagreement starts,
# `minqwen.probe`. It does two things:
#
# 1. **record and replay**: run HF once, save the exact inputs and output of chosen modules to a safetensors file
#    through forward hooks, then feed those inputs to the matching minqwen module and diff the outputs. Each module
#    is judged on HF's own inputs, so errors cannot leak from one module into the next.
# 2. **compare layers**: run both models on the same tokens and diff the embedding, every decoder layer's output,
#    the final norm and the logits, to see where the two forwards part.

# %%
# %matplotlib inline
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

import matplotlib.pyplot as plt
import pandas as pd
import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

import minqwen
from minqwen import probe

hf_logging.disable_progress_bar()  # its bars go to stderr, which nbval compares
torch.manual_seed(0)
hf = hf_model()
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
tok = tokenizer()
layers = ours.config.num_hidden_layers
print(
    type(hf).__name__,
    "and",
    type(ours).__name__,
    f"{layers} layers",
    str(DTYPE).removeprefix("torch."),
)

# %% [markdown]
# ## Recording
#
# `record` registers two hooks on each named module: a pre-hook that saves what the module is called with and a
# forward hook that saves what it returns. `with_kwargs=True` matters: HF passes most of a decoder layer's inputs
# by keyword, among them `position_embeddings`, the (cos, sin) tuple of RoPE. Tensors go into the safetensors
# file; the structure around them (tuples, None, booleans, a KV cache's fill level) goes into its metadata.

# %%
show_source(probe.record)

# %% [markdown]
# We record the embedding, every decoder layer, the parts of layer 0, the final norm and the LM head, all in one
# HF forward on one prompt.

# %%
prompt = 'def fibonacci(n):\n    """Return the nth Fibonacci number."""\n'
ids = tok(prompt, return_tensors="pt").input_ids.to(DEVICE)
parts = [
    "model.layers.0.input_layernorm",
    "model.layers.0.self_attn",
    "model.layers.0.post_attention_layernorm",
    "model.layers.0.mlp",
]
recorded = [
    "model.embed_tokens",
    *parts,
    *[f"model.layers.{i}" for i in range(layers)],
    "model.norm",
    "lm_head",
]
workdir = Path(tempfile.mkdtemp())
recording = probe.record(
    hf, recorded, workdir / "probe.safetensors", ids, use_cache=False
)
print(
    f"{ids.shape[1]} tokens, {len(recorded)} modules recorded, {recording.stat().st_size / 2**20:.1f} MiB"
)

# %% [markdown]
# What the file holds for decoder layer 0: the hidden states came positionally, the rest by keyword. The mask is
# None because the batch has no padding, so attention is plainly causal.

# %%
with safe_open(recording, framework="pt") as f:
    meta = json.loads(f.metadata()["probe"])
    shapes = {
        k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
        for k in f.keys()
        if k.startswith("model.layers.0/")
    }
pd.DataFrame(shapes, index=["shape", "dtype"]).T

# %%
print(json.dumps(meta["modules"]["model.layers.0"]["kwargs"], indent=1))

# %% [markdown]
# ## Replaying
#
# The two libraries call a decoder layer differently:
#
# | | HF `Qwen2DecoderLayer` | minqwen `DecoderLayer` |
# |---|---|---|
# | signature | `(hidden_states, attention_mask=, position_ids=, past_key_values=, use_cache=, position_embeddings=(cos, sin))` | `(x, cos, sin, mask, cache)` |
# | mask | None (causal), boolean, or additive (0 = may attend) | None (causal) or boolean |
# | returns | the hidden states (attention: `(output, weights)`) | the hidden states |
#
# so the replay has one small adapter per kind of module that says explicitly which recorded input goes where.
# Here is the decoder layer's:

# %%
show_source(probe._replay_decoder_layer)
show_source(probe.replay)

# %% [markdown]
# Replaying every recorded module on minqwen gives one row per module. Each is compared on HF's own inputs.

# %%
rows = probe.replay(recording, ours)
replayed = pd.DataFrame(probe.rows_as_dicts(rows)).set_index("hf")
replayed.assign(
    **{
        c: replayed[c].map(lambda x: f"{x:.2e}")
        for c in ("max_abs", "max_rel", "mean_abs")
    }
)

# %%
worst = max(r.max_rel for r in rows)
print(f"worst relative error over {len(rows)} modules: {worst:.2e}")
assert worst <= tolerance("elementwise")

# %% [markdown]
# In float32 on a CPU every module agrees with HF exactly: minqwen performs the same operations in the same order.
# (Under `MINQWEN_DTYPE=bfloat16` or on a GPU the check above is a tolerance, not an equality.)
#
# ## Comparing whole forwards
#
# `compare_layers` runs both models end to end and diffs what each layer hands to the next. A padded batch makes
# it harder: three prompts of different lengths, left-padded. Only real tokens are compared; what a padding position
# computes is never used.

# %%
show_source(probe.compare_layers)

# %%
prompts = [prompt, "量子计算机是如何工作的？", "Write a haiku about tensors."]
batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(DEVICE)
clean = probe.compare_layers(hf, ours, batch.input_ids, batch.attention_mask)
print(
    f"batch {tuple(batch.input_ids.shape)}, {int(batch.attention_mask.sum())} real tokens, {len(clean)} rows"
)


# %%
# NBVAL_IGNORE_OUTPUT
def as_frame(rows):
    frame = (
        pd.DataFrame(probe.rows_as_dicts(rows))
        .set_index("minqwen")
        .drop(columns=["hf", "shape"])
    )
    return frame.map(lambda x: f"{x:.2e}")


as_frame(clean).T

# %% [markdown]
# The exact digits above can change with the CPU, since minqwen builds its padded mask itself and the kernels may
# order sums differently, so the book does not compare them between runs. It checks the bound instead:

# %%
assert probe.first_divergence(clean, tolerance("forward")) is None
print(f"every row within {tolerance('forward'):.0e} relative")

# %% [markdown]
# ## Finding a bug
#
# Now a deliberate bug of the kind a hand-written loader makes: layer 13 of minqwen gets its key and value
# projections swapped (imagine a name map that mixed up `k_proj` and `v_proj`). With two key-value heads they have
# the same shape, so no shape check catches it. The logits are wrong; the question is where it starts.


# %%
def swap_key_value(attention) -> None:
    with torch.no_grad():
        for part in ("weight", "bias"):
            key, value = (
                getattr(attention.k_proj, part),
                getattr(attention.v_proj, part),
            )
            key_before = key.clone()
            key.copy_(value)
            value.copy_(key_before)


broken_layer = 13
swap_key_value(ours.layers[broken_layer].self_attn)
broken = probe.compare_layers(hf, ours, batch.input_ids, batch.attention_mask)
replayed_broken = probe.replay(recording, ours)
swap_key_value(ours.layers[broken_layer].self_attn)  # swapped back

# %%
# NBVAL_IGNORE_OUTPUT
as_frame(broken).T

# %% [markdown]
# The whole-forward comparison is clean up to layer 12, wrong from layer 13 on: the first row over tolerance names
# the layer. The replay, which feeds every layer HF's inputs, is sharper still: only layer 13 is wrong, since the
# layers after it get correct inputs and compute correct outputs.

# %%
first = probe.first_divergence(broken, tolerance("forward"))
over = [r.minqwen for r in broken if r.max_rel > tolerance("forward")]
replay_over = [
    r.minqwen for r in replayed_broken if r.max_rel > tolerance("elementwise")
]
print("first divergence (whole forward):", first.minqwen)
print(
    "over tolerance (whole forward):  ", over[0], "...", over[-1], f"({len(over)} rows)"
)
print("over tolerance (replay):         ", replay_over)
assert first.minqwen == f"layers.{broken_layer}" and over == [
    r.minqwen for r in broken[broken.index(first) :]
]
assert replay_over == [f"layers.{broken_layer}"]

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
floor = 1e-12  # exact zeros drawn at the floor of the log scale
for rows_, label, style in (
    (clean, "minqwen", "o-"),
    (broken, f"minqwen, k and v of layer {broken_layer} swapped", "s-"),
):
    ax.plot([max(r.max_rel, floor) for r in rows_], style, ms=3, label=label)
ax.axhline(tolerance("forward"), color="gray", ls="--", label="tolerance")
ax.set_xticks(
    range(len(clean)),
    [r.minqwen.replace("layers.", "") for r in clean],
    rotation=90,
    fontsize=7,
)
ax.set(
    yscale="log",
    ylabel="max |Δ| / max |HF|",
    title="Per-layer error against HF, padded batch of 3",
)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Later chapters call `probe.compare_layers` whenever a number disagrees, and `probe.record`/`probe.replay` when a
# single module is in doubt.
