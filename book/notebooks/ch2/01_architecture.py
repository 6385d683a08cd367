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
# # The architecture
#
# Before any component is written, we need the specification the rest of the book implements: which modules a
# Qwen2.5 model is made of, how a token's vector flows through them, and what changes between the seven released
# sizes. Everything on this page is read off real objects: HF's `Qwen2ForCausalLM` built from the embedded model's
# `config.json`, minqwen's own `Qwen2`, and the released configs in `minqwen.model.sizes`.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the modules of a Qwen2.5 model, and how one pre-norm decoder layer adds attention and an MLP to the
#   {term}`residual stream`;
# - how the seven released sizes differ only in widths and depth, and how many parameters each has;
# - where the parameters are: the vocabulary at 0.5B, the MLPs at 72B.
#
# **You need** the model files from {doc}`../ch0/01_weights`. No weight is loaded: every model here is built on
# PyTorch's `meta` device, which records shapes without allocating memory, so even 72B costs nothing and the page
# runs in seconds.
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import architecture as figures
from helpers import is_book_model, model_path, show_source

import json
from collections import Counter

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

import minqwen
from minqwen.model.config import ModelConfig
from minqwen.model.sizes import SIZES, parameter_count, qwen25_config, released_size

hf_config = AutoConfig.from_pretrained(model_path())
with torch.device("meta"):
    hf = Qwen2ForCausalLM(hf_config)
config = ModelConfig.from_file(model_path())

# %% [markdown]
# ## One forward pass
#
# Token ids are looked up in the embedding, pass through $N$ identical decoder layers, are normalised once more
# and projected onto the vocabulary, one score per token of the vocabulary: the {term}`logits`. Inside a layer,
# attention and the MLP each read a normalised copy of the {term}`residual stream` and add their result back to
# it. Attention uses {term}`GQA` (several query heads share one key/value head) and rotates queries and keys with
# {term}`RoPE`; the MLP is a {term}`SwiGLU`. The shapes in the figure are the embedded model's.

# %% tags=["hide-input"]
figures.computation_graph(config)

# %% [markdown]
# In minqwen the decoder layer is this figure written as code, two lines for the two red bypasses:

# %%
show_source(minqwen.model.layers.DecoderLayer.forward)

# %% [markdown]
# Each line is $x \leftarrow x + f(\operatorname{norm}(x))$: the block $f$ sees a normalised copy, and its output
# is added to the stream, which itself is never normalised in place. That is what "pre-norm" means.
#
# ## The modules
#
# `named_modules()` lists every module in HF's tree. All decoder layers are built alike, so we print the top of
# the tree and layer 0 in full (the printing helper is folded).

# %% tags=["hide-input"]
modules = dict(hf.named_modules())
figures.print_tree(modules, config.num_hidden_layers)

# %% [markdown]
# Each layer holds 2 RMSNorms, 4 attention projections and 3 MLP projections; outside the layers are the
# embedding, the final norm and the LM head. So a model of $N$ layers has $7N + 1$ Linear modules and $2N + 1$
# RMSNorms. The rotary embedding is a module in HF that holds only a buffer of frequencies; `act_fn` is the SiLU
# inside each MLP.

# %%
counts = Counter(type(m).__name__ for m in modules.values())
N = config.num_hidden_layers
print(f"{N} layers: {counts['Linear']} Linear, {counts['Qwen2RMSNorm']} RMSNorm")
assert counts["Linear"] == 7 * N + 1 and counts["Qwen2RMSNorm"] == 2 * N + 1
assert counts["Qwen2RotaryEmbedding"] == 1
assert not list(modules["model.rotary_emb"].parameters())
assert all(
    figures.layer_structure(modules, i) == figures.layer_structure(modules, 0)
    for i in range(N)
)

# %% [markdown]
# minqwen mirrors this tree name for name, without HF's `model.` prefix ({doc}`02_weight_map` maps the weights on
# exactly that rule). The two HF modules with no parameters have no module counterpart: minqwen keeps the RoPE
# frequencies as a buffer of the model and calls `F.silu` directly.

# %%
with torch.device("meta"):
    ours = minqwen.Qwen2(config)
hf_names = {n.removeprefix("model.") for n in modules if n not in ("", "model")}
our_names = {n for n, _ in ours.named_modules() if n}
hf_only = sorted({n.split(".")[-1] for n in hf_names - our_names})
print("HF only:", hf_only, "| minqwen only:", sorted(our_names - hf_names))
assert our_names <= hf_names
assert all(n.endswith((".act_fn", "rotary_emb")) for n in hf_names - our_names)

# %% [markdown]
# ## Seven sizes
#
# Every Qwen2.5 size has this same graph; only the widths and the depth change. `minqwen.model.sizes` is the book's
# single copy of the released `config.json` values:

# %%
show_source(qwen25_config)

# %% [markdown]
# One row per size, from the base configs (the folded cell builds the table; `head dim` is `hidden / heads`,
# `MLP width` is `intermediate_size`):

# %% tags=["hide-input"]
sizes = figures.sizes_table(SIZES, qwen25_config, parameter_count)
sizes

# %% [markdown]
# A few fields are the same everywhere, and the Instruct configs differ from the base ones in two fields only,
# the same for every size:

# %%
instruct = {size: qwen25_config(size) for size in SIZES}
assert {c["rope_theta"] for c in instruct.values()} == {1e6}
assert {c["rms_norm_eps"] for c in instruct.values()} == {1e-6}
assert {c["max_position_embeddings"] for c in instruct.values()} == {32768}
print("every size: rope_theta 1e6; Instruct: rms_norm_eps 1e-6, 32768 positions")

# %% [markdown]
# Patterns worth noticing: the kv heads stay at 2, 4 or 8 while query heads grow to 64, so the {term}`KV cache`
# grows far slower than the model (that is what GQA buys); the head dimension is 128 everywhere except 0.5B (64);
# the three small sizes tie the LM head to the embedding.
#
# `parameter_count` computes the totals from the configs by formula. HF builds each model on `meta` and counts its
# actual parameters, and so does minqwen from the same config; all three must agree.

# %%
built = {}
for size in SIZES:
    with torch.device("meta"):
        hf_size = Qwen2ForCausalLM(Qwen2Config(**qwen25_config(size)))
        ours_size = minqwen.Qwen2(ModelConfig.from_dict(qwen25_config(size)))
    built[size] = {
        "formula": parameter_count(size),
        "HF model": sum(p.numel() for p in hf_size.parameters()),
        "minqwen model": sum(p.numel() for p in ours_size.parameters()),
    }
built = pd.DataFrame(built).T
agree = (built["formula"] == built["HF model"]) & (
    built["formula"] == built["minqwen model"]
)
print(f"{agree.sum()}/{len(SIZES)} sizes: formula = HF's count = minqwen's count")
assert agree.all()

# %% tags=["remove-input", "hide-output"]
built.map(lambda n: f"{n:,}")

# %% [markdown]
# ## The embedded model against the table
#
# The book's model is Qwen2.5-Coder-0.5B-Instruct, converted from a {term}`GGUF` file ({doc}`../ch0/01_weights`).
# Its config should be the 0.5B Instruct row. It is, with two differences, both explained by the conversion: the
# GGUF stores a separate output matrix, so the head is untied ({doc}`02_weight_map` looks at the two matrices);
# and `rms_norm_eps` went through float32, which cannot hold 1e-6 exactly. (Under another `MINQWEN_MODEL` the row
# is that model's size, and a released or `random:` checkpoint matches it exactly.)

# %% tags=["hide-input"]
embedded_raw = json.loads((model_path() / "config.json").read_text())
size = released_size(embedded_raw)
assert size is not None, (
    "this section compares the model's config with a released Qwen2.5 size's"
)
reference = ModelConfig.from_dict(qwen25_config(size))
fields = [
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_hidden_layers",
    "rope_theta",
    "rms_norm_eps",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
    "rope_type",
]
compared = pd.DataFrame(
    {
        f: {
            f"{size} Instruct table": getattr(reference, f),
            "config.json": getattr(config, f),
        }
        for f in fields
    }
).T
compared["same"] = compared.iloc[:, 0] == compared.iloc[:, 1]
compared.astype(str)

# %%
different = set(compared.index[~compared["same"]])
assert embedded_raw["hidden_act"] == "silu" and not embedded_raw["use_sliding_window"]
if is_book_model():
    assert different == {"tie_word_embeddings", "rms_norm_eps"}, different
    assert config.rms_norm_eps == float(np.float32(1e-6))
    assert not config.tie_word_embeddings
    print(f"rms_norm_eps: {config.rms_norm_eps!r} == float32(1e-6)")
else:
    assert not different, different
    print(f"{model_path().name}: every field as in the {size} Instruct row")

# %% [markdown]
# ## Where the parameters are
#
# Grouping the embedded model's parameters by the kind of module that owns them (the folded helper
# `parameter_kind` reads the kind off the parameter's name):

# %% tags=["hide-input"]
by_kind = figures.parameters_by_kind(hf)
figures.parameters_of_one_model(
    by_kind, f"{model_path().name}: parameters by module kind"
)

# %%
total = sum(by_kind.values())
in_layers = sum(
    p.numel() for n, p in hf.named_parameters() if n.startswith("model.layers.")
)
print(
    f"embedding {by_kind['embedding'] / 1e6:.0f}M,"
    f" LM head {by_kind['LM head'] / 1e6:.0f}M,"
    f" {N} layers {in_layers / 1e6:.0f}M, total {total / 1e6:.0f}M"
)
untied_head = config.vocab_size * config.hidden_size
extra_head = (
    untied_head
    if reference.tie_word_embeddings and not config.tie_word_embeddings
    else 0
)
assert total == parameter_count(size) + extra_head
if is_book_model():
    millions = (by_kind["embedding"], by_kind["LM head"], in_layers, total)
    assert [round(n / 1e6) for n in millions] == [136, 136, 358, 630]

# %% [markdown]
# At 0.5B the vocabulary dominates: the embedding and the LM head are each 136M of the 630M parameters, and all 24
# layers together hold 358M. The attention biases and the norm weights are tiny. The same split for every size
# shows the balance moving to the MLP as models grow (tied sizes have no separate head):

# %% tags=["hide-input"]
share = {}
for size in SIZES:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**qwen25_config(size)))
    groups = Counter()
    for kind, n in figures.parameters_by_kind(model).items():
        group = (
            "embedding + head"
            if kind in ("embedding", "LM head")
            else kind.split(" ")[0]
        )
        groups[group] += n
    share[size] = {k: v / parameter_count(size) for k, v in groups.items()}
share = pd.DataFrame(share).T[["embedding + head", "attention", "MLP", "RMSNorm"]]
figures.shares_by_size(share)

# %%
print(
    f"embedding + head: {share.loc['0.5B', 'embedding + head']:.1%} of 0.5B;"
    f" MLP: {share.loc['32B', 'MLP']:.1%} of 32B, {share.loc['72B', 'MLP']:.1%} of 72B"
)
assert np.allclose(share.sum(axis=1), 1.0)
assert share.loc["0.5B", "embedding + head"] > 0.25
assert share.loc["32B", "MLP"] > 0.8 and share.loc["72B", "MLP"] > 0.75

# %% tags=["remove-input", "hide-output"]
share.map(lambda s: f"{s:.1%}")

# %% [markdown]
# ## Summary
#
# - A Qwen2.5 model is an embedding, $N$ identical pre-norm decoder layers, a final RMSNorm and an LM head; each
#   layer computes $x \leftarrow x + \operatorname{attn}(\operatorname{norm}(x))$, then
#   $x \leftarrow x + \operatorname{mlp}(\operatorname{norm}(x))$.
# - A layer has 7 Linear modules (q, k, v and o; gate, up and down) and 2 RMSNorms; only q, k and v have a bias.
# - The seven sizes share the graph and differ in width, depth, the number of kv heads and whether the head is
#   tied; `parameter_count`, HF and minqwen agree on every total.
# - Small models spend their parameters on the vocabulary (over a quarter at 0.5B), large ones on the MLPs (over
#   80% at 32B).
# - The embedded model is the 0.5B Instruct config with an untied head and a float32 epsilon, both from its GGUF
#   origin.
#
# ## Exercises
#
# ````{exercise}
# :label: architecture-layer-count
# Write the parameter count of one decoder layer as a formula of `hidden_size` $h$, the number of heads $n_q$,
# the number of kv heads $n_{kv}$, the head dimension $d$ and `intermediate_size` $m$. Check it against a
# minqwen `DecoderLayer` built on `meta` for every size.
# ````
#
# ```{solution-start} architecture-layer-count
# :class: dropdown
# ```


# %%
def layer_parameters(h, n_q, n_kv, d, m):
    attention = (h * n_q * d + n_q * d) + 2 * (h * n_kv * d + n_kv * d) + n_q * d * h
    mlp = 3 * h * m
    norms = 2 * h
    return attention + mlp + norms


for size in SIZES:
    c = ModelConfig.from_dict(qwen25_config(size))
    with torch.device("meta"):
        layer0 = minqwen.model.layers.DecoderLayer(c, layer_idx=0)
    ours_formula = layer_parameters(
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
    )
    assert ours_formula == sum(p.numel() for p in layer0.parameters()), size
    print(f"{size:>5}: {ours_formula / 1e6:8.2f}M per layer")

# %% [markdown]
# The query and output projections are $h \times n_q d$ each; the key and value projections are only
# $h \times n_{kv} d$, which is where GQA saves; the three MLP matrices, $3hm$, are the largest term in every
# size. Only q, k and v carry a bias, and each norm has one weight per channel.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: architecture-kv-bytes
# The {term}`KV cache` keeps one key and one value vector per kv head, per layer, for every token. How many bytes
# does one token cost in bf16 for each size, and how much would it cost if every query head had its own key and
# value head?
# ````
#
# ```{solution-start} architecture-kv-bytes
# :class: dropdown
# ```

# %%
rows = {}
for size in SIZES:
    c = ModelConfig.from_dict(qwen25_config(size))
    per_head = 2 * c.num_hidden_layers * c.head_dim * 2  # key + value, 2 bytes each
    rows[size] = {
        "KiB per token (GQA)": per_head * c.num_key_value_heads / 1024,
        "without GQA": per_head * c.num_attention_heads / 1024,
        "query heads per kv head": c.num_attention_heads // c.num_key_value_heads,
        "GiB at 32k tokens": per_head * c.num_key_value_heads * 32768 / 2**30,
    }
kv = pd.DataFrame.from_dict(rows, orient="index")
saving = kv["without GQA"] / kv["KiB per token (GQA)"]
assert (saving == kv["query heads per kv head"]).all()
kv.round(1)

# %% [markdown]
# At 0.5B one token costs 12 KiB of cache instead of 84 KiB; at 72B, 320 KiB instead of 2,560 KiB, so a
# 32k-token context needs 10 GiB of cache. The saving is the ratio of query heads to kv heads, 8 at 72B.
#
# ```{solution-end}
# ```
