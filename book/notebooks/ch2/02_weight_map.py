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
# A checkpoint is a dictionary from names to tensors. This chapter lists every tensor of the embedded model, maps
# each name onto minqwen's module tree, and looks closely at the one tensor whose presence depends on the model:
# the LM head, which the official 0.5B ties to the embedding and the embedded model does not.
#
# A safetensors file starts with a JSON header giving each tensor's name, dtype, shape and byte range, so the whole
# table below is read without loading a single weight.

# %%
# %matplotlib inline
from helpers import is_book_model, model_path, show_source

import re
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display
from safetensors import safe_open
from transformers import Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

import minqwen
from minqwen.config import ModelConfig
from minqwen.model import hf_to_minqwen, minqwen_to_hf

hf_logging.disable_progress_bar()  # its bars go to stderr, which nbval compares
config = ModelConfig.from_file(model_path())
checkpoints = sorted(
    model_path().glob("*.safetensors")
)  # one file here; large models shard theirs
rows = []
for checkpoint in checkpoints:
    with safe_open(checkpoint, framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            dtype = getattr(
                torch,
                {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[
                    piece.get_dtype()
                ],
            )
            shape = tuple(piece.get_shape())
            numel = torch.Size(shape).numel()
            rows.append(
                {
                    "key": key,
                    "shape": shape,
                    "dtype": str(dtype).removeprefix("torch."),
                    "parameters": numel,
                    "bytes": numel * dtype.itemsize,
                    "owning module": key.rsplit(".", 1)[0],
                }
            )
weights = pd.DataFrame(rows).set_index("key")
print(
    f"{len(weights)} tensors, {weights['parameters'].sum():,} parameters, {weights['bytes'].sum() / 2**20:,.1f} MiB"
)
file_bytes = sum(checkpoint.stat().st_size for checkpoint in checkpoints)
assert (
    weights["bytes"].sum()
    < file_bytes
    < weights["bytes"].sum() + len(checkpoints) * 2**20
)  # headers < 1 MiB

# %% [markdown]
# ## Every key
#
# The 24 layers hold the same 12 tensors each, so the table shows the tensors outside the layers and layer 0 in
# full, in file order; the next table accounts for every layer.


# %%
def layer_of(key: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return int(match[1]) if match else None


layer = weights.index.map(layer_of)
shown = weights[(layer == 0) | layer.isna()].copy()
shown["shape"] = shown["shape"].map(lambda s: " x ".join(map(str, s)))
shown["bytes"] = shown["bytes"].map(lambda b: f"{b:,}")
shown["parameters"] = shown["parameters"].map(lambda n: f"{n:,}")
shown

# %% [markdown]
# Collapsing the layer index gives one row per kind of tensor, with how many there are and what they weigh
# together. Each layer's 12 tensors are identical in shape from layer 0 to layer 23.

# %%
kind = weights.index.map(lambda k: re.sub(r"layers\.\d+\.", "layers.*.", k))
totals = (
    weights.assign(kind=kind)
    .groupby("kind", sort=False)
    .agg(
        tensors=("shape", "size"),
        shape=("shape", "first"),
        shapes=("shape", "nunique"),
        parameters=("parameters", "sum"),
        bytes=("bytes", "sum"),
    )
)
assert (totals["shapes"] == 1).all() and (
    totals.loc[[k for k in totals.index if "*" in k], "tensors"]
    == config.num_hidden_layers
).all()
assert (
    totals["tensors"].sum()
    == len(weights)
    == 12 * config.num_hidden_layers + 2 + (not config.tie_word_embeddings)
)
per_layer = {
    k: int(v)
    for k, v in weights.assign(layer=layer).groupby("layer")["parameters"].sum().items()
}
assert set(per_layer.values()) == {per_layer[0]}
totals = totals.drop(columns="shapes")
totals["share"] = (totals["bytes"] / totals["bytes"].sum()).map(lambda s: f"{s:.2%}")
totals["MiB"] = (totals.pop("bytes") / 2**20).map(lambda m: f"{m:,.2f}")
totals["shape"] = totals["shape"].map(lambda s: " x ".join(map(str, s)))
totals["parameters"] = totals["parameters"].map(lambda n: f"{n:,}")
totals

# %%
print(
    f"one decoder layer: {per_layer[0]:,} parameters; all {len(per_layer)}: {sum(per_layer.values()):,}"
)

# %% [markdown]
# ## HF names to minqwen names
#
# minqwen names its modules after HF's (chapter 2.1), so the map is one rule: drop the `model.` prefix that
# `Qwen2ForCausalLM` puts around its `Qwen2Model`. `lm_head.weight` sits outside that prefix in both. Anything else
# is not a Qwen2 tensor and is refused by name.

# %%
show_source(hf_to_minqwen)
show_source(minqwen_to_hf)

# %%
mapping = pd.DataFrame(
    {"HF key": weights.index, "minqwen name": [hf_to_minqwen(k) for k in weights.index]}
)
mapping[(layer == 0) | layer.isna()].set_index("HF key")

# %% [markdown]
# The map must be complete both ways: every key in the file lands on a parameter of minqwen's model with the same
# shape, every parameter of the model is covered, and mapping back gives the original key. minqwen's model is built
# on the `meta` device, so this check costs no memory.

# %%
with torch.device("meta"):
    ours = minqwen.Qwen2(config)
our_shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
if (
    config.tie_word_embeddings
):  # one tensor under two names; the file stores it once, as the embedding
    our_shapes.pop("lm_head.weight")
file_shapes = {hf_to_minqwen(k): s for k, s in weights["shape"].items()}
assert file_shapes == our_shapes
assert all(minqwen_to_hf(hf_to_minqwen(k)) == k for k in weights.index)
assert all(hf_to_minqwen(minqwen_to_hf(n)) == n for n in our_shapes)
print(
    f"{len(file_shapes)} keys map one to one onto minqwen's {len(our_shapes)} state_dict entries, shapes equal"
)

# %% [markdown]
# The loader, `Qwen2.from_pretrained`, applies this map and refuses any missing, unexpected or mis-shaped tensor
# before it loads anything:

# %%
show_source(minqwen.Qwen2.from_pretrained)

# %% [markdown]
# ## Tied and untied LM heads
#
# The LM head turns the final hidden state into one logit per vocabulary entry: a `vocab x hidden` matrix, the
# same shape as the embedding. Qwen2.5 0.5B, 1.5B and 3B *tie* the two: one matrix serves both, which saves 136M
# parameters at 0.5B (a fifth of the model). Their checkpoints store it once, as `model.embed_tokens.weight`.
#
# The embedded model comes from a GGUF file that stores an `output.weight` of its own, so its config says
# `tie_word_embeddings: false` and its checkpoint holds both matrices. How different are they?

# %%
if is_book_model():
    with safe_open(checkpoints[0], framework="pt") as f:
        embedding, head = (
            f.get_tensor("model.embed_tokens.weight"),
            f.get_tensor("lm_head.weight"),
        )
    row_cosine = torch.nn.functional.cosine_similarity(embedding, head, dim=1)
    difference = {
        "identical": torch.equal(embedding, head),
        "max |E - H|": f"{(embedding - head).abs().max().item():.3e}",
        "max |E|": f"{embedding.abs().max().item():.3e}",
        "||E - H|| / ||E||": f"{((embedding - head).norm() / embedding.norm()).item():.3f}",
        "row cosine, min": f"{row_cosine.min().item():.4f}",
        "row cosine, mean": f"{row_cosine.mean().item():.4f}",
    }
    display(pd.Series(difference, name="embedding E vs head H").to_frame())
else:
    print(
        f"{model_path().name}: tie_word_embeddings={config.tie_word_embeddings}; this section studies the book's model"
    )

# %% [markdown]
# Close, but not equal: every row points the same way (cosine above 0.998) and the two differ by about 4% in norm.
# They are one matrix, the tied matrix of the original model, quantized twice with different precision when the
# GGUF was made. GGUF's formats store each block of 32 consecutive weights as small integers times one scale per
# block, so within a block every gap between two values is a whole number of steps. Dividing a block's range by
# its smallest gap counts the steps it spans: never more than 31 in the embedding (5-bit integers), up to 255 in
# the head (8-bit).


# %%
def steps_per_block(
    matrix: torch.Tensor, rows: slice = slice(None, None, 16)
) -> torch.Tensor:
    blocks = matrix[rows].reshape(-1, 32).sort(dim=-1).values
    gaps = blocks[:, 1:] - blocks[:, :-1]
    smallest = torch.where(gaps > 0, gaps, torch.inf).min(dim=-1).values
    return ((blocks[:, -1] - blocks[:, 0]) / smallest).round().long()


if is_book_model():
    steps = {"embedding": steps_per_block(embedding), "LM head": steps_per_block(head)}
    print({name: int(v.max()) for name, v in steps.items()})
    assert steps["embedding"].max() <= 31 < steps["LM head"].max() <= 255

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    axes[0].hist(row_cosine.numpy(), bins=60, color="#4c72b0")
    axes[0].set(
        title="cosine(E row, H row), every token",
        xlabel="cosine similarity",
        ylabel="tokens",
    )
    for (name, v), color in zip(steps.items(), ("#dd8452", "#55a868")):
        axes[1].hist(
            v.numpy(), bins=range(0, 257, 4), color=color, alpha=0.7, label=name
        )
    axes[1].set(
        title="quantization steps spanned per 32-weight block",
        xlabel="steps",
        ylabel="blocks",
        yscale="log",
    )
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    del embedding, head  # 1 GiB we no longer need

# %% [markdown]
# So the embedded model keeps its own head: tying it now would replace the finer 8-bit head with the coarser
# 5-bit embedding and change the logits. minqwen's loader follows the config either way. Two tiny random
# checkpoints show both cases: HF's `save_pretrained` writes the tied matrix once, and minqwen's loaded model
# then holds one tensor under both names; the untied one keeps two tensors. Both give HF's logits exactly.

# %%
from transformers import Qwen2Config

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
        "tensors outside the layers in the file": ", ".join(stored),
        "lm_head is embed_tokens": loaded.lm_head.weight is loaded.embed_tokens.weight,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "logits equal HF's": same_logits,
    }
cases = pd.DataFrame(cases).T
cases

# %%
assert (
    cases.loc["tied", "lm_head is embed_tokens"]
    and not cases.loc["untied", "lm_head is embed_tokens"]
)
assert (
    "lm_head.weight" not in cases.loc["tied", "tensors outside the layers in the file"]
)
assert cases["logits equal HF's"].all()
assert (
    cases.loc["untied", "parameters"] - cases.loc["tied", "parameters"]
    == tiny["vocab_size"] * tiny["hidden_size"]
)

# %% [markdown]
# With the names mapped and the head understood, chapter 2.3 builds the tool that compares any module of minqwen
# with its HF counterpart on HF's own inputs.
