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
# # The weight map
#
# A checkpoint is a dictionary from names to tensors. Which names does the embedded model's file hold, what does
# each weigh, and how does each land on a parameter of minqwen's module tree? And why does this checkpoint hold an
# LM head of its own when the official 0.5B ties it to the embedding?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - every tensor of the checkpoint, read from the {term}`safetensors` header without loading a weight, and where
#   its bytes go;
# - the one-rule map from HF's names to minqwen's, checked complete in both directions;
# - tied and untied LM heads: what each stores, and why the book's model keeps two different matrices.
#
# **You need** the module tree from {doc}`01_architecture`, and the safetensors layout from
# {doc}`../ch0/01_weights`. Running it reads the embedded model's file (about 20 seconds on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import weight_map as figures
from helpers import is_book_model, model_path, show_source

import re
import tempfile
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM

import minqwen
from minqwen.model.config import ModelConfig
from minqwen.model.qwen2 import hf_to_minqwen, minqwen_to_hf

config = ModelConfig.from_file(model_path())

# %% [markdown]
# ## Every key
#
# A safetensors file starts with a JSON header giving each tensor's name, dtype, shape and byte range, so the whole
# inventory is read without loading a single weight. The folded helper `header_table` turns the header of every
# file (one here; large models shard theirs) into one row per tensor.

# %%
checkpoints = sorted(model_path().glob("*.safetensors"))
weights = figures.header_table(checkpoints)
file_bytes = sum(checkpoint.stat().st_size for checkpoint in checkpoints)
print(
    f"{len(weights)} tensors, {weights['parameters'].sum():,} parameters, "
    f"{weights['bytes'].sum() / 2**20:,.1f} MiB of tensors"
    f" in {file_bytes / 2**20:,.1f} MiB"
)
assert (
    weights["bytes"].sum()
    < file_bytes
    < weights["bytes"].sum() + len(checkpoints) * 2**20
)

# %% [markdown]
# The bytes beyond the tensors are the header, well under a MiB. The decoder layers hold the same 12 tensors
# each, so here are the tensors outside the layers and layer 0 in full, in file order (alphabetical):

# %% tags=["hide-input"]
layer = weights.index.map(figures.layer_of)
figures.readable(weights[(layer == 0) | layer.isna()].drop(columns="bytes"))

# %% [markdown]
# Collapsing the layer index gives one row per kind of tensor. Every layer's tensors have layer 0's shapes, and
# each kind appears once per layer:

# %%
kind = weights.index.map(lambda k: re.sub(r"layers\.\d+\.", "layers.*.", k))
totals = (
    weights.assign(kind=kind)
    .groupby("kind", sort=False)
    .agg(tensors=("shape", "size"), shapes=("shape", "nunique"), bytes=("bytes", "sum"))
)
N = config.num_hidden_layers
assert (totals["shapes"] == 1).all()
assert (totals.loc[totals.index.str.contains(r"\*"), "tensors"] == N).all()
expected = 12 * N + 2 + (not config.tie_word_embeddings)
assert totals["tensors"].sum() == len(weights) == expected
print(
    f"{len(totals)} kinds of tensor, {len(weights)} tensors"
    f" = 12 x {N} layers + {expected - 12 * N}"
)

# %% tags=["remove-input", "hide-output"]
pd.DataFrame(
    {
        "tensors": totals["tensors"],
        "MiB": (totals["bytes"] / 2**20).map(lambda m: f"{m:,.2f}"),
        "share": (totals["bytes"] / totals["bytes"].sum()).map(lambda s: f"{s:.2%}"),
    }
)

# %% [markdown]
# ## Where the bytes go
#
# Drawn to scale, the checkpoint is two vocabulary matrices with the decoder layers between them; inside a layer,
# the three MLP matrices outweigh all of attention, and the key and value projections are small because of
# {term}`GQA` (2 kv heads of 64 channels against 14 query heads).

# %% tags=["hide-input"]
figures.where_the_bytes_go(weights, N)

# %%
per_layer = weights.assign(layer=layer).groupby("layer")["parameters"].sum()
assert per_layer.nunique() == 1 and len(per_layer) == N
print(
    f"one decoder layer: {per_layer.iloc[0]:,} parameters; all {N}: {per_layer.sum():,}"
)

# %% [markdown]
# ## HF names to minqwen names
#
# minqwen names its modules after HF's ({doc}`01_architecture`), so the map is one rule: drop the `model.`
# prefix that `Qwen2ForCausalLM` puts around its `Qwen2Model`. `lm_head.weight` sits outside that prefix in both.
# Anything else is not a Qwen2 tensor and is refused by name.

# %%
show_source(hf_to_minqwen)
show_source(minqwen_to_hf)

# %% tags=["hide-input"]
for key in (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.norm.weight",
    "lm_head.weight",
):
    print(f"{key:40} -> {hf_to_minqwen(key)}")

# %% [markdown]
# The map must be complete both ways: every key in the file lands on a parameter of minqwen's model with the same
# shape, every parameter of the model is covered, and mapping back gives the original key. minqwen's model is built
# on the `meta` device, so this check costs no memory.

# %%
with torch.device("meta"):
    ours = minqwen.Qwen2(config)
our_shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
if config.tie_word_embeddings:
    # one tensor under two names; the file stores it once, as the embedding
    our_shapes.pop("lm_head.weight")
file_shapes = {hf_to_minqwen(k): s for k, s in weights["shape"].items()}
assert file_shapes == our_shapes
assert all(minqwen_to_hf(hf_to_minqwen(k)) == k for k in weights.index)
assert all(hf_to_minqwen(minqwen_to_hf(n)) == n for n in our_shapes)
print(
    f"{len(file_shapes)} keys map one to one onto minqwen's {len(our_shapes)} "
    "state_dict entries, shapes equal"
)

# %% tags=["remove-input", "hide-output"]
pd.DataFrame(
    {"minqwen name": [hf_to_minqwen(k) for k in weights.index]}, index=weights.index
)

# %% [markdown]
# The loader, `Qwen2.from_pretrained`, applies this map and refuses any missing, unexpected or mis-shaped tensor
# from the files' headers, before it reads any tensor. Then it reads them one at a time, so that a model quantized
# while loading ({doc}`../ch6/03_int4_weights`) never holds all its float weights at once:

# %%
show_source(minqwen.Qwen2.from_pretrained)

# %% [markdown]
# ## Tied and untied LM heads
#
# The LM head turns the final hidden state into the {term}`logits`, one per vocabulary entry: a `vocab x hidden`
# matrix, the same shape as the embedding. Qwen2.5 0.5B, 1.5B and 3B *tie* the two: one matrix
# serves both, which saves 136M parameters at 0.5B (a fifth of the model). Their checkpoints store it once, as
# `model.embed_tokens.weight`.
#
# The embedded model comes from a {term}`GGUF` file that stores an `output.weight` of its own, so its config says
# `tie_word_embeddings: false` and its checkpoint holds both matrices. How different are they?

# %% tags=["hide-input"]
if is_book_model():
    with safe_open(checkpoints[0], framework="pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
        head = f.get_tensor("lm_head.weight")
    row_cosine = torch.nn.functional.cosine_similarity(embedding, head, dim=1)
    relative = ((embedding - head).norm() / embedding.norm()).item()
    difference = {
        "identical": torch.equal(embedding, head),
        "max |E - H|": f"{(embedding - head).abs().max().item():.3e}",
        "max |E|": f"{embedding.abs().max().item():.3e}",
        "||E - H|| / ||E||": f"{relative:.3f}",
        "row cosine, min": f"{row_cosine.min().item():.4f}",
        "row cosine, mean": f"{row_cosine.mean().item():.4f}",
    }
    display(pd.Series(difference, name="embedding E vs head H").to_frame())
else:
    print(
        f"{model_path().name}: tie_word_embeddings={config.tie_word_embeddings}; "
        "this section studies the book's model"
    )

# %% [markdown]
# Close, but not equal: every row points the same way (cosine above 0.998) and the two differ by about 4% in norm.
# They are one matrix, the tied matrix of the original model, quantized twice with different precision when the
# GGUF was made. GGUF's formats store each block of 32 consecutive weights as small integers times one scale per
# block, so within a block every gap between two values is a whole number of steps. Dividing a block's range by
# its smallest gap counts the steps it spans: never more than 31 in the embedding (5-bit integers), up to 255 in
# the head (8-bit).


# %%
def steps_per_block(matrix: torch.Tensor, rows=slice(None, None, 16)) -> torch.Tensor:
    blocks = matrix[rows].reshape(-1, 32).sort(dim=-1).values
    gaps = blocks[:, 1:] - blocks[:, :-1]
    smallest = torch.where(gaps > 0, gaps, torch.inf).min(dim=-1).values
    return ((blocks[:, -1] - blocks[:, 0]) / smallest).round().long()


if is_book_model():
    steps = {"embedding": steps_per_block(embedding), "LM head": steps_per_block(head)}
    print({name: int(v.max()) for name, v in steps.items()})
    assert steps["embedding"].max() <= 31 < steps["LM head"].max() <= 255
    assert row_cosine.min() > 0.998 and not torch.equal(embedding, head)

# %% tags=["hide-input"]
if is_book_model():
    figures.quantization_traces(row_cosine, steps)
    del embedding, head  # 1 GiB we no longer need

# %% [markdown]
# So the embedded model keeps its own head: tying it now would replace the finer 8-bit head with the coarser
# 5-bit embedding and change the logits. minqwen's loader follows the config either way. Two tiny random
# checkpoints show both cases: HF's `save_pretrained` writes the tied matrix once, and minqwen's loaded model
# then holds one tensor under both names; the untied one keeps two tensors. Both give HF's logits exactly.

# %% tags=["hide-input"]
tiny = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
)
ids = torch.arange(12)[None]
workdir = Path(tempfile.mkdtemp())
cases = {}
for tied in (True, False):
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(Qwen2Config(**tiny, tie_word_embeddings=tied)).eval()
    folder = workdir / ("tied" if tied else "untied")
    reference.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        stored = sorted(k for k in f.keys() if not k.startswith("model.layers."))
    loaded = minqwen.Qwen2.from_pretrained(folder)
    with torch.no_grad():
        same_logits = torch.equal(loaded(ids), reference(ids).logits)
    cases["tied" if tied else "untied"] = {
        "stored outside the layers": ", ".join(k.split(".")[-2] for k in stored),
        "head is embedding": loaded.lm_head.weight is loaded.embed_tokens.weight,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "logits equal HF's": same_logits,
    }
cases = pd.DataFrame(cases).T
cases

# %%
tied, untied = cases.loc["tied"], cases.loc["untied"]
assert tied["head is embedding"] and not untied["head is embedding"]
assert "lm_head" not in tied["stored outside the layers"]
assert "lm_head" in untied["stored outside the layers"]
assert tied["logits equal HF's"] and untied["logits equal HF's"]
assert (
    untied["parameters"] - tied["parameters"]
    == tiny["vocab_size"] * tiny["hidden_size"]
)

# %% [markdown]
# ## Summary
#
# - A safetensors header lists every tensor's name, dtype, shape and byte range, so a checkpoint's inventory costs
#   no memory: here 12 tensors per decoder layer, plus the embedding, the final norm and the LM head.
# - At 0.5B most of the bytes are the two vocabulary matrices; inside a layer the MLP outweighs attention, and
#   GQA keeps the key and value projections small.
# - HF's names become minqwen's by dropping `model.`; the map is complete and exact in both directions, and the
#   loader refuses any missing, unexpected or mis-shaped tensor.
# - A tied model stores one matrix for the embedding and the head. The book's model stores two, quantized
#   differently from one original, so it must stay untied.
#
# ## Exercises
#
# ````{exercise}
# :label: weight-map-layer-bytes
# From `config.json` alone, compute the bytes of one decoder layer in the checkpoint's dtype. Then read the
# safetensors header by hand (8 bytes of little-endian length, then JSON) and add up the byte ranges of layer 0's
# tensors. Do they agree?
# ````
#
# ```{solution-start} weight-map-layer-bytes
# :class: dropdown
# ```

# %%
import json
import struct

raw = json.loads((model_path() / "config.json").read_text())
h, m = raw["hidden_size"], raw["intermediate_size"]
q = raw["num_attention_heads"] * (h // raw["num_attention_heads"])
kv = raw["num_key_value_heads"] * (h // raw["num_attention_heads"])
numbers = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * m + 2 * h
dtype = raw.get("torch_dtype") or raw["dtype"]
itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]

with open(checkpoints[0], "rb") as f:
    length = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(length))
ranges = [
    v["data_offsets"] for k, v in header.items() if k.startswith("model.layers.0.")
]
from_header = sum(end - start for start, end in ranges)
print(
    f"from config.json: {numbers * itemsize:,} bytes; from the header: {from_header:,}"
)
assert numbers * itemsize == from_header

# %% [markdown]
# Attention is $hq + q$ for the query projection (weight and bias), twice $h\,kv + kv$ for keys and values, and
# $qh$ for the output; the MLP is $3hm$; the two norms are $h$ each. Multiplied by the bytes per value of the
# stored dtype, that is exactly the sum of layer 0's byte ranges in the header.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: weight-map-refused
# Break the tiny untied checkpoint the way a wrong converter would: rename `k_proj` to `key_proj` in every key of
# its file, and load it with `minqwen.Qwen2.from_pretrained`. What does the loader say?
# ````
#
# ```{solution-start} weight-map-refused
# :class: dropdown
# ```

# %%
from safetensors.torch import load_file, save_file

broken = workdir / "broken"
broken.mkdir()
tensors = load_file(workdir / "untied" / "model.safetensors")
renamed = {k.replace("k_proj", "key_proj"): v for k, v in tensors.items()}
save_file(renamed, broken / "model.safetensors", metadata={"format": "pt"})
(broken / "config.json").write_text((workdir / "untied" / "config.json").read_text())
try:
    minqwen.Qwen2.from_pretrained(broken)
except ValueError as error:
    message = str(error).replace(str(broken), "broken")
    print(message.replace(" | ", "\n"))
else:
    raise AssertionError("the loader accepted a checkpoint with renamed keys")
assert "key_proj" in message

# %% [markdown]
# `hf_to_minqwen` maps `key_proj` to a name minqwen's model does not have, so the loader reports the unexpected
# and the missing names and loads nothing. A shape check alone would not catch a swap of `k_proj` and `v_proj`,
# which have the same shape here: {doc}`03_layer_probe` finds that kind of fault.
#
# ```{solution-end}
# ```
