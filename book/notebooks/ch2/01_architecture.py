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
# This chapter is the specification the rest of the book implements. It answers three questions before any
# component is written: which modules a Qwen2.5 model is made of, how data flows through them, and how the seven
# released sizes differ. Everything here is read off real objects: HF's `Qwen2ForCausalLM` built from the embedded
# model's `config.json`, and the configs in `minqwen.sizes`.
#
# Building the HF model on PyTorch's `meta` device gives every module and every parameter shape without allocating
# a single weight, so this chapter costs nothing even for 72B.

# %%
# %matplotlib inline
from helpers import is_book_model, model_path, show_source

import json
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.patches import FancyBboxPatch
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

import minqwen
from minqwen.config import ModelConfig
from minqwen.sizes import SIZES, parameter_count, qwen25_config, released_size

hf_config = AutoConfig.from_pretrained(model_path())
with torch.device("meta"):
    hf = Qwen2ForCausalLM(hf_config)
config = ModelConfig.from_file(model_path())
print(
    type(hf).__name__,
    f"{sum(p.numel() for p in hf.parameters()):,} parameters",
    "on",
    next(hf.parameters()).device,
)

# %% [markdown]
# ## The modules
#
# `named_modules()` lists every module in the tree. All 24 decoder layers are built alike, so we print the top of
# the tree and layer 0 in full, then check that every other layer has exactly layer 0's structure.

# %%
modules = dict(hf.named_modules())


def describe(module) -> str:
    shape = {
        "Linear": lambda m: (
            f"{m.in_features} -> {m.out_features}, bias={m.bias is not None}"
        ),
        "Embedding": lambda m: f"{m.num_embeddings} x {m.embedding_dim}",
        "Qwen2RMSNorm": lambda m: f"{m.weight.shape[0]}, eps={m.variance_epsilon:.0e}",
    }
    kind = type(module).__name__
    return f"{kind}({shape[kind](module)})" if kind in shape else kind


for name, module in modules.items():
    if not name.startswith("model.layers.") or name.startswith("model.layers.0"):
        print(f"{name or '(root)':42s} {describe(module)}")
last = config.num_hidden_layers - 1
print(
    f"{f'model.layers.1 ... model.layers.{last}':42s} {last} more Qwen2DecoderLayer, each shaped like model.layers.0"
)


# %%
def layer_structure(i: int) -> list[tuple[str, str]]:
    prefix = f"model.layers.{i}"
    return [
        (n.removeprefix(prefix), describe(m))
        for n, m in modules.items()
        if n.startswith(prefix + ".") or n == prefix
    ]


assert all(
    layer_structure(i) == layer_structure(0) for i in range(config.num_hidden_layers)
)
counts = Counter(type(m).__name__ for m in modules.values())
pd.Series(counts, name="modules").to_frame()

# %% [markdown]
# 24 layers, each with 2 RMSNorms, 4 attention projections and 3 MLP projections, plus the embedding, the final
# norm and the LM head: 24 x 7 + 1 = 169 Linear modules, 24 x 2 + 1 = 49 RMSNorms. The rotary embedding is a module
# in HF that holds only a buffer of frequencies; `act_fn` is the SiLU inside each MLP.

# %%
assert (
    counts["Linear"] == 7 * config.num_hidden_layers + 1
    and counts["Qwen2RMSNorm"] == 2 * config.num_hidden_layers + 1
)
assert counts["Qwen2RotaryEmbedding"] == 1 and not list(
    modules["model.rotary_emb"].parameters()
)

# %% [markdown]
# minqwen mirrors this tree name for name, without HF's `model.` prefix (chapter 2.2 maps the weights on exactly
# that rule). The two HF modules with no parameters have no module counterpart: minqwen keeps the RoPE frequencies
# as a buffer of the model and calls `F.silu` directly.

# %%
with torch.device("meta"):
    ours = minqwen.Qwen2(config)
hf_names = {n.removeprefix("model.") for n in modules if n not in ("", "model")}
our_names = {n for n, _ in ours.named_modules() if n}
print(
    "HF only:",
    sorted({n.split(".")[-1] for n in hf_names - our_names}),
    "| minqwen only:",
    sorted(our_names - hf_names),
)
assert {
    n for n in hf_names - our_names if not n.endswith((".act_fn", "rotary_emb"))
} == set() and our_names <= hf_names

# %% [markdown]
# ## The computation graph
#
# One forward pass: token ids are looked up in the embedding, pass through N identical pre-norm decoder layers,
# are normalised once more and projected onto the vocabulary. Inside a layer, attention and the MLP each read a
# normalised copy of the residual stream and add their result back to it. The shapes are the embedded model's.

# %%
c = config


def draw_graph():
    fig, ax = plt.subplots(figsize=(9.5, 6.6))
    ax.set(xlim=(0, 10.2), ylim=(1.7, 12.5))
    ax.axis("off")

    def box(x, y, text, color, width=3.6, height=0.72):
        ax.add_patch(
            FancyBboxPatch(
                (x - width / 2, y - height / 2),
                width,
                height,
                boxstyle="round,pad=0.04",
                facecolor=color,
                edgecolor="0.3",
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
        return x, y, height

    def arrow(a, b, **style):
        ax.annotate(
            "",
            xy=(b[0], b[1] + b[2] / 2),
            xytext=(a[0], a[1] - a[2] / 2),
            arrowprops=dict(arrowstyle="-|>", color="0.3", **style),
        )

    blue, green, orange, gray, pink = (
        "#dbe9f6",
        "#dff2df",
        "#fde5cc",
        "#eeeeee",
        "#f8dde6",
    )
    left = [
        box(2.1, 11.6, "input_ids [b, s]", gray),
        box(2.1, 10.2, f"Embedding\n{c.vocab_size} x {c.hidden_size}", blue),
        box(
            2.1,
            8.4,
            f"Decoder layer x {c.num_hidden_layers}\nx: [b, s, {c.hidden_size}]",
            pink,
            height=1.4,
        ),
        box(2.1, 6.6, f"RMSNorm (eps {c.rms_norm_eps:.0e})", green),
        box(
            2.1,
            5.2,
            f"LM head {c.hidden_size} -> {c.vocab_size}\n"
            + (
                "tied to the embedding"
                if c.tie_word_embeddings
                else "its own matrix (untied)"
            ),
            blue,
        ),
        box(2.1, 3.8, f"logits [b, s, {c.vocab_size}]", gray),
    ]
    for a, b in zip(left, left[1:]):
        arrow(a, b)
    g = c.kv_groups
    right = [
        box(7.0, 11.8, f"x [b, s, {c.hidden_size}]", gray, height=0.5),
        box(7.0, 10.9, "RMSNorm (input_layernorm)", green, height=0.55),
        box(
            7.0,
            9.85,
            f"q_proj, k_proj, v_proj (with bias)\nq: {c.num_attention_heads} heads, k, v: {c.num_key_value_heads} heads, x {c.head_dim}",
            orange,
            width=4.4,
            height=0.85,
        ),
        box(
            7.0,
            8.8,
            f"RoPE on q and k (theta {c.rope_theta:.0e})",
            orange,
            width=4.4,
            height=0.55,
        ),
        box(
            7.0,
            7.8,
            f"GQA: softmax(q k^T / sqrt({c.head_dim}) + causal) v\neach kv head serves {g} query heads",
            orange,
            width=4.4,
            height=0.85,
        ),
        box(
            7.0,
            6.8,
            f"o_proj {c.num_attention_heads * c.head_dim} -> {c.hidden_size}",
            orange,
            width=4.4,
            height=0.55,
        ),
        box(7.0, 5.95, "+ residual", gray, width=1.6, height=0.5),
        box(7.0, 5.1, "RMSNorm (post_attention_layernorm)", green, height=0.55),
        box(
            7.0,
            4.0,
            f"SwiGLU MLP: down(silu(gate(x)) * up(x))\n{c.hidden_size} -> {c.intermediate_size} -> {c.hidden_size}",
            blue,
            width=4.4,
            height=0.85,
        ),
        box(7.0, 2.95, "+ residual", gray, width=1.6, height=0.5),
        box(7.0, 2.15, f"x [b, s, {c.hidden_size}]", gray, height=0.5),
    ]
    for a, b in zip(right, right[1:]):
        arrow(a, b)
    for (start, end), x in zip(
        ((right[0], right[6]), (right[6], right[9])), (9.55, 9.75)
    ):
        # the residual stream bypasses each block and is added back after it
        ax.plot(
            [start[0] + 1.0, x, x],
            [start[1], start[1], end[1]],
            color="#c0392b",
            lw=1.2,
        )
        ax.annotate(
            "",
            xy=(end[0] + 0.8, end[1]),
            xytext=(x, end[1]),
            arrowprops=dict(arrowstyle="-|>", color="#c0392b", lw=1.2),
        )
    ax.text(
        9.9,
        7.4,
        "residual stream",
        rotation=90,
        color="#c0392b",
        fontsize=8,
        va="center",
    )
    ax.plot(
        [3.9, 4.7], [9.1, 12.05], ls=":", color="0.5"
    )  # the pink box on the left, expanded on the right
    ax.plot([3.9, 4.7], [7.7, 1.9], ls=":", color="0.5")
    ax.text(2.1, 12.25, "Qwen2ForCausalLM", ha="center", fontsize=10, weight="bold")
    ax.text(
        7.0,
        12.3,
        "one decoder layer (pre-norm)",
        ha="center",
        fontsize=10,
        weight="bold",
    )
    return fig


draw_graph()
plt.show()

# %% [markdown]
# The decoder layer in minqwen is this figure written as code:

# %%
show_source(minqwen.layers.DecoderLayer.forward)

# %% [markdown]
# ## Seven sizes
#
# Every Qwen2.5 size has this same graph; only the widths and the depth change. The table is built from
# `minqwen.sizes`, the book's single copy of the released `config.json` values. Where the base and the Instruct
# configs differ, both are given as base / Instruct. `head_dim` is `hidden_size / heads` for all of them.

# %%
show_source(qwen25_config)

# %%
rows = {}
for size in SIZES:
    base, instruct = qwen25_config(size, instruct=False), qwen25_config(size)
    rows[size] = {
        "hidden_size": base["hidden_size"],
        "heads": base["num_attention_heads"],
        "kv heads": base["num_key_value_heads"],
        "head_dim": base["hidden_size"] // base["num_attention_heads"],
        "intermediate_size": base["intermediate_size"],
        "layers": base["num_hidden_layers"],
        "rope_theta": f"{base['rope_theta']:.0e}",
        "rms_norm_eps": f"{base['rms_norm_eps']:.0e} / {instruct['rms_norm_eps']:.0e}",
        "vocab": base["vocab_size"],
        "tied embeddings": base["tie_word_embeddings"],
        "max positions": f"{base['max_position_embeddings']} / {instruct['max_position_embeddings']}",
        "parameters": f"{parameter_count(size) / 1e9:.3f}B",
    }
sizes = pd.DataFrame(rows).T
sizes

# %% [markdown]
# Patterns worth noticing: the kv heads stay at 2, 4 or 8 while query heads grow to 64, so the KV cache grows far
# slower than the model (grouped-query attention); head_dim is 128 everywhere except 0.5B (64); the three small
# sizes tie the LM head to the embedding, which at 0.5B is a quarter of all parameters.
#
# `parameter_count` computes the totals from the configs by formula. HF builds each model (on `meta`, so even 72B
# is free), and its actual parameter count must agree, as must minqwen's own model built from the same config.

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
assert (built["formula"] == built["HF model"]).all() and (
    built["formula"] == built["minqwen model"]
).all()
built.map(lambda n: f"{n:,}")

# %% [markdown]
# ## The embedded model against the table
#
# The book's model is Qwen2.5-Coder-0.5B-Instruct, converted from a GGUF file (chapter 0). Its config should be
# the 0.5B Instruct row. It is, with two differences, both explained by the conversion: the GGUF stores a separate
# output matrix, so the head is untied (chapter 2.2 looks at the two matrices); and `rms_norm_eps` went through
# float32, which cannot hold 1e-6 exactly. (Under another `MINQWEN_MODEL` the row is that model's size, and a
# released or `random:` checkpoint matches it exactly.)

# %%
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
    assert (
        config.rms_norm_eps == float(np.float32(1e-6))
        and not config.tie_word_embeddings
    )
    print(f"rms_norm_eps: {config.rms_norm_eps!r} == float32(1e-6)")
else:
    assert not different, different

# %% [markdown]
# ## Where the parameters are
#
# Grouping the embedded model's parameters by the kind of module that owns them:


# %%
def parameter_kind(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "LM head"
    if "norm" in name:
        return "RMSNorm weights"
    part = name.split(".")[-2]
    if "self_attn" in name:
        return (
            "attention biases (q, k, v)"
            if name.endswith("bias")
            else f"attention {part}"
        )
    return f"MLP {part}"


by_kind = Counter()
for name, p in hf.named_parameters():
    by_kind[parameter_kind(name)] += p.numel()
kinds = pd.DataFrame({"parameters": pd.Series(by_kind)})
kinds["share"] = (kinds["parameters"] / kinds["parameters"].sum()).map(
    lambda s: f"{s:.2%}"
)
head_the_table_ties = (
    c.vocab_size * c.hidden_size
    if reference.tie_word_embeddings and not c.tie_word_embeddings
    else 0
)
assert kinds["parameters"].sum() == parameter_count(size) + head_the_table_ties
in_layers = sum(
    p.numel() for n, p in hf.named_parameters() if n.startswith("model.layers.")
)
if is_book_model():
    assert [
        round(n / 1e6)
        for n in (
            by_kind["embedding"],
            by_kind["LM head"],
            in_layers,
            kinds["parameters"].sum(),
        )
    ] == [136, 136, 358, 630]
kinds.assign(parameters=kinds["parameters"].map(lambda n: f"{n:,}"))

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
ordered = kinds["parameters"].sort_values()
ax.barh(ordered.index, ordered.values / 1e6, color="#4c72b0")
for y, v in enumerate(ordered.values):
    ax.text(v / 1e6 + 2, y, f"{v / 1e6:.2f}M", va="center", fontsize=8)
ax.set(
    xlabel="parameters (millions)",
    title=f"{model_path().name}: parameters by module kind",
    xlim=(0, ordered.max() / 1e6 * 1.2),
)
plt.show()

# %% [markdown]
# At 0.5B the vocabulary dominates: embedding and LM head are each 136M of the 630M parameters, the 24 layers
# together hold 358M. The attention biases and norm weights are tiny. The same split for every size shows how the
# balance moves to the MLP as models grow (tied sizes have no separate head):

# %%
share = {}
for size in SIZES:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**qwen25_config(size)))
    groups = Counter()
    for name, p in model.named_parameters():
        kind = parameter_kind(name)
        groups[
            "embedding + head"
            if kind in ("embedding", "LM head")
            else kind.split(" ")[0]
        ] += p.numel()
    share[size] = {k: v / parameter_count(size) for k, v in groups.items()}
share = pd.DataFrame(share).T[["embedding + head", "attention", "MLP", "RMSNorm"]]
assert np.allclose(share.sum(axis=1), 1.0)
ax = share.plot.barh(
    stacked=True, figsize=(8, 3.2), color=["#8c8c8c", "#dd8452", "#4c72b0", "#55a868"]
)
ax.set(
    xlabel="share of parameters", ylabel="", title="Where the parameters are, by size"
)
ax.invert_yaxis()
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
plt.show()

# %%
print(share.map(lambda s: f"{s:.1%}").to_string())
assert (
    share.loc["0.5B", "embedding + head"] > 0.25
    and share.loc["32B", "MLP"] > 0.8
    and share.loc["72B", "MLP"] > 0.75
)

# %% [markdown]
# This is the specification. Chapter 2.2 maps every tensor of the checkpoint onto it, chapter 2.3 builds the probe
# that compares any one module with HF's, and chapter 3 implements the modules one by one.
