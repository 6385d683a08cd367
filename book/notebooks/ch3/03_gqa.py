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
# Each decoder layer's attention projects the normalised hidden state into queries, keys and values, rotates
# the queries and keys (RoPE, previous chapter), compares every query with the keys at or before its position,
# and mixes the values with the resulting weights. Qwen2.5 does this with **grouped-query attention** (GQA):
# many query heads, few key/value heads, each kv head shared by a group of query heads. The KV cache holds only
# the kv heads, so GQA shrinks it by the group size: 7 here.
#
# We run layer 0 of HF's model once on a short prompt, capture every intermediate (Q, K, V, the scores, the
# weights, the output), and rebuild each one with minqwen.

# %%
# %matplotlib inline
from helpers import (
    DEVICE,
    DTYPE,
    diff_stats,
    diff_table,
    model_path,
    show_source,
    table,
    tokenizer,
    tolerance,
)

import math

import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import (
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)
from transformers.utils import logging as hf_logging

import minqwen
from minqwen.layers import Attention
from minqwen.rope import apply_rope, rope_cos_sin

hf_logging.disable_progress_bar()
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
    f"heads {config.num_attention_heads}, kv heads {config.num_key_value_heads}, head_dim {config.head_dim}, "
    f"group size {config.kv_groups}"
)

# %% [markdown]
# ## The weights
#
# `q_proj` maps the 896-wide hidden state to 14 heads x 64 channels; `k_proj` and `v_proj` map it to only 2 x 64.
# All three carry a bias (Qwen2 keeps them; Llama dropped them). `o_proj`, which mixes the heads back, has none.

# %%
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
# every key, the same for all tokens.

# %%
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
bias_norms.map(lambda x: f"{x:.2f}")

# %%
assert [
    p.shape[0]
    for p in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
] == [H * D, KV * D, KV * D]
assert attention.o_proj.bias is None and attention.q_proj.bias is not None

# %% [markdown]
# ## One HF attention run, captured
#
# Hooks record what layer 0's attention receives (the normalised hidden states, cos/sin, the mask), what each
# projection returns, the input of `o_proj` (the heads' output side by side) and the attention's own output.
# `output_attentions=True` makes the eager implementation return its softmax weights as well.

# %%
prompt = "def area(radius):\n    return 3.14159 * radius ** 2"
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
    hf(ids, output_attentions=True)
for handle in handles:
    handle.remove()
hf_output, hf_weights = captured["attention"]
print(
    f"{seq} tokens; HF's mask is {captured['mask'].dtype} {tuple(captured['mask'].shape)}, weights {tuple(hf_weights.shape)}"
)

# %% [markdown]
# HF's scores are not returned by any module, so we recompute them from the captured tensors with HF's own
# pieces (`apply_rotary_pos_emb`, `repeat_kv`), exactly as `eager_attention_forward` does, and check that its
# softmax gives back the captured weights.


# %%
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
assert torch.equal(hf_weights_again, hf_weights)
assert torch.equal(hf_again.reshape(1, seq, -1), captured["heads_out"])

# %% [markdown]
# ## The same, with minqwen
#
# Step by step, with minqwen's layer 0 weights and functions. The steps spelled out here are what
# `minqwen.layers.Attention.forward` does, except that it leaves scores, softmax and mixing to PyTorch's fused
# `scaled_dot_product_attention`; we compare that too at the end.

# %%
show_source(Attention.forward)

# %%
with torch.no_grad():
    x = captured["hidden_states"]
    q = heads(attention.q_proj(x), H)
    k, v = heads(attention.k_proj(x), KV), heads(attention.v_proj(x), KV)
    cos, sin = rope_cos_sin(
        ours.inv_freq, torch.arange(seq, device=DEVICE)[None], ours.rope_scale, x.dtype
    )
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # each query head reads the kv head of its group: heads 0-6 read kv head 0, heads 7-13 kv head 1
    k_all, v_all = (
        k_rot.repeat_interleave(config.kv_groups, dim=1),
        v.repeat_interleave(config.kv_groups, dim=1),
    )
    scores = q_rot @ k_all.transpose(2, 3) / math.sqrt(D)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=DEVICE).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    heads_out = (weights @ v_all).transpose(1, 2).reshape(1, seq, -1)
    output = attention.o_proj(heads_out)
    package_output = attention(x, cos, sin, None)

visible = causal.expand_as(
    scores
)  # HF fills hidden scores with the dtype's minimum, we leave them: compare the rest
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
diff_table(steps)

# %% [markdown]
# Every step written out is bit-identical to HF's eager path: the same float32 operations in the same order.
# The package's `Attention.forward` hands scores, softmax and mixing to the fused SDPA kernel, which sums in
# another order and agrees to float32 rounding. The bit-exact steps are asserted as such, the rest to a tolerance.

# %%
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

# %% [markdown]
# ## Broadcasting kv heads: `repeat_interleave`, not `repeat`
#
# With 2 kv heads and groups of 7, query head `h` must read kv head `h // 7`. `repeat_interleave` lays the copies
# out that way; `repeat` tiles the whole block instead, sending query head 1 to kv head 1, head 2 to kv head 0,
# and so on. HF's `repeat_kv` (an `expand` and a `reshape`) is the interleaved layout.

# %%
kv_of_head = torch.arange(KV)
print("repeat_interleave:", kv_of_head.repeat_interleave(config.kv_groups).tolist())
print("repeat:           ", kv_of_head.repeat(config.kv_groups).tolist())
assert torch.equal(
    repeat_kv(k_rot, config.kv_groups), k_rot.repeat_interleave(config.kv_groups, dim=1)
)

with torch.no_grad():
    wrong_k, wrong_v = (
        k_rot.repeat(1, config.kv_groups, 1, 1),
        v.repeat(1, config.kv_groups, 1, 1),
    )
    wrong_weights = (
        (q_rot @ wrong_k.transpose(2, 3) / math.sqrt(D))
        .masked_fill(~causal, float("-inf"))
        .softmax(-1)
    )
    wrong_output = attention.o_proj(
        (wrong_weights @ wrong_v).transpose(1, 2).reshape(1, seq, -1)
    )
wrong = diff_table(
    {"repeat_interleave": (output, hf_output), "repeat": (wrong_output, hf_output)}
)
wrong

# %%
assert diff_stats(wrong_output, hf_output)["max_rel"] > 0.01
assert diff_stats(output, hf_output)["max_rel"] <= tolerance("elementwise") * 10

# %% [markdown]
# ## Attention maps
#
# Layer 0's 14 heads on the prompt, each row a query token, each column a key. The upper triangle is empty
# (causal mask). Heads in the same row of the figure share a kv head, hence the same keys; their queries differ.
# Layer 0's patterns are mostly positional: some heads look at the current token, some at the few tokens before
# it, some spread their weight, and several put a share of it on the first token (the mean is printed below).

# %%
fig, axes = plt.subplots(
    KV, config.kv_groups, figsize=(2 * config.kv_groups, 2.2 * KV), squeeze=False
)
for h, ax in enumerate(axes.flat):
    ax.imshow(weights[0, h].float().cpu(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"head {h} (kv {h // config.kv_groups})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("layer 0 attention weights (query rows x key columns)")
plt.show()

# %%
# the head that looks least at the first token, to see something other than the sink
head = int(weights[0, :, 1:, 0].mean(-1).argmin())
fig, ax = plt.subplots(figsize=(6, 5))
ax.imshow(weights[0, head].float().cpu(), cmap="viridis", vmin=0, vmax=1)
labels = [repr(t)[1:-1] for t in tokens]
ax.set_xticks(range(seq), labels, rotation=90, fontsize=8)
ax.set_yticks(range(seq), labels, fontsize=8)
ax.set_title(f"layer 0, head {head}")
plt.show()

# %%
first_token_share = weights[0, :, 1:, 0].mean().item()
print(f"mean weight on the first token (queries after it): {first_token_share:.2f}")
assert torch.allclose(
    weights.sum(-1).float(),
    torch.ones(1, H, seq, device=DEVICE),
    atol=tolerance("elementwise"),
)
