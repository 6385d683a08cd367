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
# # Grouped-query attention
#
# Each decoder layer's attention projects the normalised hidden state into queries, keys and values, rotates the
# queries and keys, compares every query with the keys at or before its position, and mixes the values with the
# resulting weights. Qwen2.5 does it with many query heads and few key/value heads. What exactly does one
# attention layer compute, how do the query heads share the kv heads, and what do the heads of a trained model
# look at?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - scaled dot-product attention with a {term}`causal mask`, rebuilt step by step and compared with HF's
#   intermediates;
# - how {term}`GQA` maps query head $h$ to kv head $\lfloor h / (H/H_\text{kv}) \rfloor$, and why
#   `repeat_interleave` is right and `repeat` wrong;
# - what the trained heads attend to across the layers: previous-token heads and attention sinks, found with a
#   score.
#
# **You need** the layout of a decoder layer from {doc}`../ch2/01_architecture` and {term}`RoPE` from
# {doc}`02_rope`. Running it takes the embedded model (under a minute on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import gqa as figures
from helpers import (
    DEVICE,
    DTYPE,
    MODEL_SOURCE,
    diff_stats,
    diff_table,
    is_book_model,
    model_path,
    show_source,
    table,
    tokenizer,
    tolerance,
)

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import (
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)

import minqwen
from minqwen.model.layers import Attention
from minqwen.model.rope import apply_rope, rope_cos_sin
from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, qwen25_config

torch.manual_seed(0)
# eager attention: the implementation that can return its attention weights
hf = (
    AutoModelForCausalLM.from_pretrained(
        model_path(), dtype=DTYPE, attn_implementation="eager"
    )
    .to(DEVICE)
    .eval()
)
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
config = ours.config
H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
print(
    f"H = {H} query heads, H_kv = {KV} kv heads of d = {D} channels, "
    f"groups of {config.kv_groups}"
)

# %% [markdown]
# ## Scaled dot-product attention
#
# For one head, stack the sequence's queries, keys and values as the rows of $Q, K, V \in \mathbb{R}^{T \times d}$.
# Query $i$ scores key $j$ by their dot product, scaled by $1/\sqrt{d}$ so that the scores' spread does not grow
# with $d$; a softmax over each row turns the scores into weights that sum to one, and the output of row $i$ is
# the weighted mean of the values:
#
# $$
# \operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right) V,
# \qquad
# M_{ij} = \begin{cases} 0 & j \le i, \\ -\infty & j > i. \end{cases}
# $$
#
# $M$ is the causal mask: $e^{-\infty} = 0$, so a token gives no weight to the tokens after it, and a model that
# predicts the next token cannot read it. Before the product, RoPE rotates each query and key by its position.
#
# ## Grouped-query attention
#
# A layer runs $H$ such heads side by side and concatenates their outputs. With multi-head attention each head
# has its own keys and values; with GQA the $H$ query heads share $H_\text{kv}$ kv heads, each read by a group of
# $H/H_\text{kv}$ consecutive query heads:
#
# $$
# \operatorname{kv}(h) = \left\lfloor \frac{h}{H / H_\text{kv}} \right\rfloor, \qquad h = 0, \dots, H - 1.
# $$
#
# The {term}`KV cache` stores keys and values only, $H_\text{kv}$ heads instead of $H$, so GQA divides its size by
# the group size $H/H_\text{kv}$.

# %% tags=["hide-input"]
figures.head_groups(H, KV)

# %% [markdown]
# ## The weights
#
# `q_proj` maps the hidden state to $H$ heads of $d$ channels; `k_proj` and `v_proj` to only $H_\text{kv}$. All
# three carry a bias (Qwen2 keeps them, Llama dropped them); `o_proj`, which mixes the heads back, has none.

# %% tags=["hide-input"]
attention = ours.layers[0].self_attn
table(
    [
        {
            "tensor": f"self_attn.{name}",
            "shape": tuple(p.shape),
            "parameters": p.numel(),
            "heads": p.shape[0] // config.head_dim if "o_proj" not in name else "-",
        }
        for name, p in attention.named_parameters()
    ]
).set_index("tensor")

# %% [markdown]
# The biases are not small. The key bias in particular is large in a few channels: it adds a fixed direction to
# every key, the same for all tokens. The norm of each bias, per kv head, in layer 0:

# %% tags=["hide-input"]
bias_norms = table(
    {
        name: [
            getattr(attention, name).bias.view(-1, config.head_dim)[h].norm().item()
            for h in range(config.num_key_value_heads)
        ]
        for name in ("q_proj", "k_proj", "v_proj")
    },
    index=[f"head {h}" for h in range(config.num_key_value_heads)],
)
shapes = [
    p.shape[0]
    for p in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
]
assert shapes == [H * D, KV * D, KV * D]
assert attention.o_proj.bias is None and attention.q_proj.bias is not None
bias_norms.map(lambda x: f"{x:.2f}")

# %% [markdown]
# ## One HF attention run, captured
#
# The sentence below goes through HF's model once. Hooks record what layer 0's attention receives (the normalised
# hidden states, cos/sin, the mask), what each projection returns, the input of `o_proj` (the heads' outputs side
# by side) and the attention's output; `output_attentions=True` makes the eager implementation return every
# layer's softmax weights as well.

# %% tags=["hide-input"]
prompt = (
    "The quick brown fox jumps over the lazy dog "
    "because it wanted to see the other side."
)
ids = tokenizer()(prompt, return_tensors="pt").input_ids.to(DEVICE)
tokens = [tokenizer().decode([t]) for t in ids[0]]
seq = ids.shape[1]
hf_attention = hf.model.layers[0].self_attn
captured = {}


def keep_output(name):
    def hook(module, args, output):
        captured[name] = output

    return hook


def keep_inputs(module, args, kwargs):
    captured["hidden_states"] = kwargs["hidden_states"]
    captured["cos"], captured["sin"] = kwargs["position_embeddings"]
    captured["mask"] = kwargs["attention_mask"]


handles = [hf_attention.register_forward_pre_hook(keep_inputs, with_kwargs=True)]
handles += [
    getattr(hf_attention, n).register_forward_hook(keep_output(n))
    for n in ("q_proj", "k_proj", "v_proj")
]
handles += [
    hf_attention.o_proj.register_forward_pre_hook(
        lambda m, args: captured.update(heads_out=args[0])
    )
]
handles += [hf_attention.register_forward_hook(keep_output("attention"))]
with torch.no_grad():
    all_weights = hf(ids, output_attentions=True).attentions
for handle in handles:
    handle.remove()
hf_output, hf_weights = captured["attention"]
mask = captured["mask"]
print(f"{seq} tokens:", "|".join(tokens))
print(
    f"HF's mask: {'none' if mask is None else f'{mask.dtype} {tuple(mask.shape)}'}; "
    f"layer 0's weights {tuple(hf_weights.shape)}"
)

# %% [markdown]
# No module returns HF's scores, so they are recomputed from the captured tensors with HF's own pieces
# (`apply_rotary_pos_emb`, `repeat_kv`), as `eager_attention_forward` does; its softmax gives back the captured
# weights exactly.


# %% tags=["hide-input"]
def heads(t, n):
    return t.view(1, seq, n, D).transpose(1, 2)


with torch.no_grad():
    hf_q, hf_k = apply_rotary_pos_emb(
        heads(captured["q_proj"], H),
        heads(captured["k_proj"], KV),
        captured["cos"],
        captured["sin"],
    )
    hf_v = heads(captured["v_proj"], KV)
    hf_scores = (
        hf_q @ repeat_kv(hf_k, config.kv_groups).transpose(2, 3) * hf_attention.scaling
    )
    hf_again, hf_weights_again = eager_attention_forward(
        hf_attention, hf_q, hf_k, hf_v, captured["mask"], scaling=hf_attention.scaling
    )
replayed = torch.equal(hf_weights_again, hf_weights) and torch.equal(
    hf_again.reshape(1, seq, -1), captured["heads_out"]
)
print(
    "eager_attention_forward on the captured tensors gives back HF's weights "
    f"and output: {replayed}"
)
assert torch.equal(hf_weights_again, hf_weights)
assert torch.equal(hf_again.reshape(1, seq, -1), captured["heads_out"])

# %% [markdown]
# ## The same, with minqwen
#
# Step by step, with minqwen's layer 0 weights and functions. The scores are $QK^\top/\sqrt{d}$, the causal
# mask fills the scores above the diagonal with $-\infty$, and the softmax runs over the keys;
# `repeat_interleave` hands each query head the kv head $\lfloor h / 7 \rfloor$ of its group.
# `minqwen.model.layers.Attention.forward` does the same, except that it leaves scores, softmax and mixing to PyTorch's
# fused `scaled_dot_product_attention`, compared at the end:

# %%
show_source(Attention.forward)

# %%
with torch.no_grad():
    x = captured["hidden_states"]
    q = heads(attention.q_proj(x), H)
    k, v = heads(attention.k_proj(x), KV), heads(attention.v_proj(x), KV)
    positions = torch.arange(seq, device=DEVICE)[None]
    cos, sin = rope_cos_sin(ours.inv_freq, positions, ours.rope_scale, x.dtype)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # query head h reads kv head h // kv_groups
    k_all = k_rot.repeat_interleave(config.kv_groups, dim=1)
    v_all = v.repeat_interleave(config.kv_groups, dim=1)
    scores = q_rot @ k_all.transpose(2, 3) / math.sqrt(D)  # Q Kᵀ / √d
    causal = torch.ones(seq, seq, dtype=torch.bool, device=DEVICE).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # + M
    heads_out = (weights @ v_all).transpose(1, 2).reshape(1, seq, -1)
    output = attention.o_proj(heads_out)
    package_output = attention(x, cos, sin, None)

# %% tags=["hide-input"]
# HF fills hidden scores with the dtype's minimum, we leave them: compare the rest
visible = causal.expand_as(scores)
steps = {
    "Q (projection)": (q, heads(captured["q_proj"], H)),
    "K (projection)": (k, heads(captured["k_proj"], KV)),
    "V (projection)": (v, hf_v),
    "cos": (cos, captured["cos"]),
    "sin": (sin, captured["sin"]),
    "Q (rotated)": (q_rot, hf_q),
    "K (rotated)": (k_rot, hf_k),
    "scores (visible)": (scores[visible], hf_scores[visible]),
    "weights": (weights, hf_weights),
    "heads' output": (heads_out, captured["heads_out"]),
    "attention output": (output, hf_output),
    "Attention.forward (SDPA)": (package_output, hf_output),
}
identical = [name for name, (a, b) in steps.items() if torch.equal(a, b)]
worst = max(diff_stats(a, b)["max_rel"] for a, b in steps.values())
print(
    f"{len(identical)}/{len(steps)} steps bit-identical to HF's; "
    f"the rest within {worst:.1e} relative"
)
for name in (
    "Q (projection)",
    "K (projection)",
    "V (projection)",
    "cos",
    "sin",
    "Q (rotated)",
    "K (rotated)",
):
    assert torch.equal(*steps[name]), name
for name, (a, b) in steps.items():
    assert diff_stats(a, b)["max_rel"] <= tolerance("elementwise") * 10, name
assert torch.equal(weights[~visible], torch.zeros_like(weights[~visible]))
assert torch.allclose(
    weights.sum(-1).float(),
    torch.ones(1, H, seq, device=DEVICE),
    atol=tolerance("elementwise"),
)

# %% tags=["remove-input", "hide-output"]
diff_table(steps)

# %% [markdown]
# The steps written out are HF's eager path, the same operations in the same order, and in float32 on a CPU
# they come out bit-identical. The fused SDPA kernel of `Attention.forward` sums in another order and agrees
# to rounding. Every row of the weights sums to one, and the masked entries are exactly zero. The table of all
# steps is folded above.
#
# ## Broadcasting kv heads: `repeat_interleave`, not `repeat`
#
# With groups of 7, query head $h$ must read kv head $\lfloor h/7 \rfloor$. `repeat_interleave` lays the copies
# out that way; `repeat` tiles the whole block instead, so query head 1 reads kv head 1, head 2 kv head 0, and so
# on. HF's `repeat_kv` (an `expand`, then a `reshape`) is the interleaved layout.

# %%
kv_of_head = torch.arange(KV)
print("repeat_interleave:", kv_of_head.repeat_interleave(config.kv_groups).tolist())
print("repeat:           ", kv_of_head.repeat(config.kv_groups).tolist())
assert torch.equal(
    repeat_kv(k_rot, config.kv_groups), k_rot.repeat_interleave(config.kv_groups, dim=1)
)

# %% tags=["hide-input"]
with torch.no_grad():
    wrong_k = k_rot.repeat(1, config.kv_groups, 1, 1)
    wrong_v = v.repeat(1, config.kv_groups, 1, 1)
    wrong_weights = (
        (q_rot @ wrong_k.transpose(2, 3) / math.sqrt(D))
        .masked_fill(~causal, float("-inf"))
        .softmax(-1)
    )
    wrong_output = attention.o_proj(
        (wrong_weights @ wrong_v).transpose(1, 2).reshape(1, seq, -1)
    )
wrong = {"repeat_interleave": (output, hf_output), "repeat": (wrong_output, hf_output)}
print(
    "layer 0's output against HF's, relative: repeat_interleave "
    f"{diff_stats(output, hf_output)['max_rel']:.1e}, "
    f"repeat {diff_stats(wrong_output, hf_output)['max_rel']:.1e}"
)
assert diff_stats(wrong_output, hf_output)["max_rel"] > 0.01
assert diff_stats(output, hf_output)["max_rel"] <= tolerance("elementwise") * 10

# %% tags=["remove-input", "hide-output"]
diff_table(wrong)

# %% [markdown]
# With `repeat`, six of every seven query heads read the wrong keys and values: the output is off by a large
# fraction, not by rounding.
#
# ## What the heads look at
#
# Every layer's weights came back from the run above, $H$ maps of $T \times T$ per layer. Two patterns are worth
# naming, and each has a score, computed for every head as a mean over the queries $i \ge 1$ (query 0 can only
# look at itself):
#
# $$
# \text{previous}(\ell, h) = \frac{1}{T-1}\sum_{i=1}^{T-1} w^{\ell h}_{i,\,i-1},
# \qquad
# \text{sink}(\ell, h) = \frac{1}{T-1}\sum_{i=1}^{T-1} w^{\ell h}_{i,\,0}.
# $$
#
# A **previous-token head** puts most of its weight on the token just before: it copies "what came before me"
# into the {term}`residual stream`, a building block of many later circuits. An **attention sink** puts most of
# its weight on the first token whatever it is: softmax weights must sum to one, and a head with nothing to
# look for parks its weight on a token whose value contributes little. A head is labelled when its score is above
# one half, "most of its weight".

# %%
threshold = 0.5
w = torch.stack(all_weights)[:, 0].float().cpu()  # [layer, head, query, key]
previous = w.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)  # w[i, i-1], i >= 1
sink = w[:, :, 1:, 0].mean(-1)  # w[i, 0], i >= 1
n_previous, n_sink = int((previous > threshold).sum()), int((sink > threshold).sum())
# a head that spreads its weight evenly gives 1/(i+1) to every key of query i
uniform = sum(1 / (i + 1) for i in range(1, seq)) / (seq - 1)
print(f"of {previous.numel()} heads, scores above {threshold}:")
print(f"{n_previous} previous-token heads, {n_sink} sinks")
print(f"a head attending uniformly would score {uniform:.2f} on both")

# %% tags=["hide-input"]
assert torch.equal(torch.stack(all_weights)[0], hf_weights)
if is_book_model():
    assert n_previous > 0 and n_sink > 0
elif MODEL_SOURCE.startswith("random:"):
    assert n_previous == 0 and n_sink == 0  # random weights attend almost uniformly
figures.head_scores(previous, sink, threshold)

# %% [markdown]
# Previous-token heads are few and sit mostly in the first layers; sinks take over from layer 3 or so, where many
# heads send most of their weight to the first token. Here are the maps themselves, for four layers spread over
# the depth, every head; framed heads are those the scores label.

# %% tags=["hide-input"]
shown = sorted(
    {
        0,
        config.num_hidden_layers // 3,
        2 * config.num_hidden_layers // 3,
        config.num_hidden_layers - 1,
    }
)
figures.attention_grid(w, shown, previous, sink, threshold)

# %% [markdown]
# Up close, with the tokens: the head with the highest previous-token score, a bright line just below the
# diagonal, and the head with the highest sink score, a bright first column.

# %% tags=["hide-input"]
best_previous = divmod(int(previous.argmax()), H)
best_sink = divmod(int(sink.argmax()), H)
labels = [repr(t)[1:-1] for t in tokens]
figures.close_ups(
    [w[best_previous], w[best_sink]],
    [
        f"layer {best_previous[0]}, head {best_previous[1]}: "
        f"previous {previous[best_previous]:.2f}",
        f"layer {best_sink[0]}, head {best_sink[1]}: sink {sink[best_sink]:.2f}",
    ],
    labels,
)

# %% [markdown]
# ## Summary
#
# - One head computes $\operatorname{softmax}(QK^\top/\sqrt{d} + M)V$; the causal mask $M$ puts $-\infty$ above the
#   diagonal, so each token's weights cover itself and the tokens before it and sum to one.
# - With GQA, query head $h$ reads kv head $\lfloor h/(H/H_\text{kv}) \rfloor$; Qwen2.5-0.5B's 14 query heads
#   share 2 kv heads, and the KV cache is 7 times smaller than with one kv head per query head.
# - Broadcasting the kv heads must keep groups together: `repeat_interleave` (HF's `repeat_kv`), never
#   `repeat`.
# - minqwen's step-by-step attention is HF's eager path, and the fused SDPA kernel agrees to rounding.
# - A trained model's heads specialise: a few previous-token heads, mostly early, and many sinks that park their
#   weight on the first token; random weights attend almost uniformly and have neither.
#
# ## Exercises
#
# ````{exercise}
# :label: gqa-kv-cache
# Compute the KV cache of one token, in bf16, for every Qwen2.5 size from `minqwen.model.sizes`, as the models store it
# (GQA) and as it would be with one kv head per query head. How much does GQA save for each size?
# ````
#
# ```{solution-start} gqa-kv-cache
# :class: dropdown
# ```

# %%
rows = []
for size in SIZES:
    c = qwen25_config(size)
    heads_q, heads_kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c["hidden_size"] // heads_q
    per_token = 2 * c["num_hidden_layers"] * heads_kv * head_dim * 2  # K and V, bf16
    assert per_token == kv_cache_bytes_per_token(size, "bfloat16")
    rows.append(
        {
            "size": size,
            "H": heads_q,
            "H_kv": heads_kv,
            "GQA (KiB/token)": per_token / 1024,
            "one kv head per head (KiB/token)": per_token * heads_q / heads_kv / 1024,
            "saving": f"{heads_q // heads_kv}x",
        }
    )
savings = table(rows).set_index("size")
seven_b = savings.loc["7B"]
# KiB per token x 32,768 tokens / 2^20 KiB per GiB = KiB per token / 32
print(
    f"7B at 32,768 tokens: {seven_b['GQA (KiB/token)'] / 32:.2f} GiB with GQA, "
    f"{seven_b['one kv head per head (KiB/token)'] / 32:.2f} GiB without"
)
savings

# %% [markdown]
# The saving is the group size $H/H_\text{kv}$, between 5x and 8x depending on the size (the last column). For a
# long context it decides whether the cache fits beside the weights at all, as the line above the table shows
# for the 7B model.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: gqa-causal
# Probe the causal mask on the whole model: change the last word of the sentence and show that minqwen's logits
# at every earlier position stay exactly the same, while the last position's change.
# ````
#
# ```{solution-start} gqa-causal
# :class: dropdown
# ```

# %%
other = tokenizer()(prompt.replace("side.", "bank."), return_tensors="pt").input_ids.to(
    DEVICE
)
assert other.shape == ids.shape and (other != ids).sum() == 1
with torch.no_grad():
    before, after = ours(ids), ours(other)
changed = int((other != ids)[0].nonzero()[0])
print(
    f"token {changed} of {seq} changed: {tokens[changed]!r} -> "
    f"{tokenizer().decode(other[0, changed])!r}"
)
print(
    "logits before it identical: "
    f"{torch.equal(before[:, :changed], after[:, :changed])}"
)
print(
    "logits from it on differ by up to "
    f"{(before[:, changed:] - after[:, changed:]).abs().max():.2f}"
)
assert torch.equal(before[:, :changed], after[:, :changed])
assert not torch.equal(before[:, changed:], after[:, changed:])

# %% [markdown]
# Positions before the changed token never see it, so their logits are the same numbers, bit for bit: the
# causal mask is also what lets a {term}`KV cache` keep past keys and values unchanged.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: gqa-sdpa
# PyTorch's `scaled_dot_product_attention` accepts fewer kv heads than query heads with `enable_gqa=True`.
# Compute layer 0's heads with it, without `repeat_interleave`, and compare with the weights-times-values
# computed above.
# ````
#
# ```{solution-start} gqa-sdpa
# :class: dropdown
# ```

# %%
with torch.no_grad():
    fused = F.scaled_dot_product_attention(
        q_rot, k_rot, v, is_causal=True, enable_gqa=True
    )
fused_error = diff_stats(fused.transpose(1, 2).reshape(1, seq, -1), heads_out)[
    "max_rel"
]
print(
    f"SDPA with enable_gqa against the step-by-step heads: {fused_error:.1e} relative"
)
assert fused_error <= tolerance("elementwise") * 10

# %% [markdown]
# The kernel groups the query heads over the kv heads itself, in the same interleaved layout: no copy of the keys
# and values is made, which matters once the KV cache is long.
#
# ```{solution-end}
# ```
