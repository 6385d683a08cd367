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
# # The KV cache in transformers
#
# The loop of chapter 1 runs the whole sequence through the model again for every new token. Most of that work is
# wasted. Attention at position $t$ needs the keys and values of positions $0..t$, and those of $0..t-1$ were
# already computed on the previous step and have not changed. A causal model never lets an old token see a new one.
# The **KV cache** keeps them. Each step then feeds one token, computes its query, key and value, appends the key
# and value to the cache, and attends over everything stored.
#
# This notebook looks at transformers' own cache (the 5.x object), before chapter 4.2 builds one.

# %%
from helpers import (
    DEVICE,
    DTYPE,
    diff_stats,
    diff_table,
    hf_model,
    show_figure,
    tokenizer,
    tolerance,
)

import matplotlib.pyplot as plt
import pandas as pd
import torch
from transformers.utils import logging as hf_logging

from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, qwen25_config
from minqwen.tools.hardware import memory_estimate

hf_logging.disable_progress_bar()
model, tok = hf_model(), tokenizer()
config = model.config
messages = [{"role": "user", "content": "Explain what a KV cache is in one sentence."}]
prompt = tok.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt"
)["input_ids"].to(DEVICE)
print(
    f"prompt: {prompt.shape[1]} tokens; {config.num_hidden_layers} layers, {config.num_key_value_heads} kv heads, "
    f"head_dim {config.hidden_size // config.num_attention_heads}"
)

# %% [markdown]
# ## Prefill: the cache object
#
# With `use_cache=True` the forward pass returns `past_key_values`. In transformers 5.x this is a `DynamicCache`.
# It holds one entry per layer in `cache.layers`, and each entry has `.keys` and `.values` shaped
# `[batch, kv_heads, seq, head_dim]`. The 4.x habits (`cache[i]`, `cache.key_cache`, tuples of tuples) are gone.
#
# The first pass over the whole prompt is the **prefill**. It fills the cache with one key and one value per prompt
# token, in every layer.

# %%
with torch.inference_mode():
    out = model(prompt, use_cache=True)
cache = out.past_key_values
head_dim = config.hidden_size // config.num_attention_heads
print(type(cache).__name__, "with", len(cache.layers), "layers")
print("layer 0 keys  ", tuple(cache.layers[0].keys.shape), cache.layers[0].keys.dtype)
print("layer 0 values", tuple(cache.layers[0].values.shape))
print("cached positions:", cache.get_seq_length())

# %%
expected = (1, config.num_key_value_heads, prompt.shape[1], head_dim)
assert len(cache.layers) == config.num_hidden_layers
assert all(layer.keys.shape == layer.values.shape == expected for layer in cache.layers)
assert cache.get_seq_length() == prompt.shape[1]

# %% [markdown]
# ## Decode: one token at a time
#
# Each decode step feeds only the newest token together with the cache. The model computes that token's key and
# value, appends them (the cache grows by one position in every layer), and attends over all positions.
# The table follows the cache through five greedy steps.

# %%
rows = [
    {
        "step": "prefill",
        "tokens fed": prompt.shape[1],
        "cached positions": cache.get_seq_length(),
        "layer 0 keys": tuple(cache.layers[0].keys.shape),
    }
]
sequence = prompt
next_token = out.logits[:, -1].argmax(-1, keepdim=True)
step_logits = []
with torch.inference_mode():
    for step in range(1, 6):
        sequence = torch.cat([sequence, next_token], dim=1)
        out = model(next_token, past_key_values=cache, use_cache=True)
        step_logits.append(out.logits[:, -1])
        rows.append(
            {
                "step": f"decode {step}",
                "tokens fed": next_token.shape[1],
                "cached positions": cache.get_seq_length(),
                "layer 0 keys": tuple(cache.layers[0].keys.shape),
            }
        )
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
pd.DataFrame(rows).set_index("step")

# %% [markdown]
# The cache changes the cost of a step, not its result. The last five steps' logits, computed from the cache,
# equal those of one full forward pass over the whole sequence with no cache.

# %%
with torch.inference_mode():
    full = model(sequence, use_cache=False).logits[:, -5:]
cached = torch.stack(step_logits, dim=1)
diffs = diff_table({"decode steps 1-5 vs full forward": (cached, full)})
diffs

# %%
assert float(diffs.iloc[0]["max_rel"]) <= tolerance("forward")
assert cache.get_seq_length() == sequence.shape[1]

# %% [markdown]
# ## Positions index the cache
#
# The token fed at a decode step sits at position `past = cache.get_seq_length()`. transformers reads that
# number from the cache (`cache_position`) and rotates the new query and key by RoPE for position `past`.
# The keys in the cache are stored **after** rotation. A cached key never changes, and nothing about earlier
# positions is recomputed.
#
# Two checks show this. First, the cached keys of layer 0 equal the rotated keys of a full forward pass.
# Second, feeding the new token with the wrong position (0) changes its logits. The cache itself carries no
# positions, so the caller must keep them right.

# %%
with torch.inference_mode():
    fresh = model(sequence[:, :-1], use_cache=True).past_key_values
assert diff_stats(cache.layers[0].keys[:, :, :-1], fresh.layers[0].keys)[
    "max_rel"
] <= tolerance("forward")

past = fresh.get_seq_length()
with torch.inference_mode():
    right = model(
        sequence[:, -1:],
        past_key_values=fresh,
        position_ids=torch.tensor([[past]], device=DEVICE),
    ).logits
    fresh.crop(
        -1
    )  # forget the token just appended, then feed it again with a wrong position
    wrong = model(
        sequence[:, -1:],
        past_key_values=fresh,
        position_ids=torch.tensor([[0]], device=DEVICE),
    ).logits
shift = (right - wrong).abs().max().item()
print(
    f"position {past} vs position 0: logits differ by up to {shift:.1f}; next token {right.argmax().item()} vs {wrong.argmax().item()}"
)
assert diff_stats(right[:, -1], full[:, -1])["max_rel"] <= tolerance("forward")
assert (
    shift > 3 * tolerance("forward") * full.abs().max().item()
)  # far outside what rounding explains

# %% [markdown]
# ## What the cache costs
#
# Per token, the cache holds one key and one value vector per kv head in every layer:
# `2 x layers x kv_heads x head_dim x bytes`. Grouped-query attention keeps it small. Qwen2.5 has only 2 to 8 kv
# heads against 14 to 64 query heads. The numbers follow from the configs of all seven sizes.

# %%
actual = (
    sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    / cache.get_seq_length()
)
per_token = (
    2
    * config.num_hidden_layers
    * config.num_key_value_heads
    * head_dim
    * torch.finfo(DTYPE).bits
    // 8
)
print(
    f"this model's cache: {actual:,.0f} bytes per token ({str(DTYPE).removeprefix('torch.')})"
)
assert actual == per_token

rows = []
for size in SIZES:
    c = qwen25_config(size)
    rows.append(
        {
            "size": size,
            "layers": c["num_hidden_layers"],
            "kv heads": c["num_key_value_heads"],
            "head_dim": c["hidden_size"] // c["num_attention_heads"],
            "KiB/token bf16": kv_cache_bytes_per_token(size, "bfloat16") / 1024,
            "GiB at 32k tokens bf16": round(
                kv_cache_bytes_per_token(size, "bfloat16") * 32768 / 2**30, 2
            ),
        }
    )
pd.DataFrame(rows).set_index("size")

# %%
assert kv_cache_bytes_per_token("0.5B", "float32") == 2 * 24 * 2 * 64 * 4 == 24576
assert kv_cache_bytes_per_token("72B", "bfloat16") == 2 * 80 * 8 * 128 * 2

# %% [markdown]
# The cache grows linearly with context length and with batch size, while the weights stay fixed. The dashed
# lines mark the bf16 weights of three sizes. The table gives the context at which the cache of one sequence
# weighs as much as the weights. A batch of $b$ sequences reaches that point $b$ times sooner.

# %%
contexts = [2**k for k in range(9, 20)]
fig, ax = plt.subplots()
for size in SIZES:
    (line,) = ax.plot(
        contexts,
        [kv_cache_bytes_per_token(size) * n / 2**30 for n in contexts],
        marker="o",
        ms=3,
        label=size,
    )
    if size in ("0.5B", "7B", "72B"):
        ax.axhline(
            memory_estimate(size)["weights"] / 2**30,
            color=line.get_color(),
            ls="--",
            lw=0.8,
        )
ax.set(
    xscale="log",
    yscale="log",
    xlabel="context length (tokens)",
    ylabel="KV cache, GiB (bf16, batch 1)",
    title="KV cache memory against context length",
)
ax.legend(ncol=2, fontsize=8)
show_figure(fig)

# %%
even = {
    size: memory_estimate(size)["weights"] // kv_cache_bytes_per_token(size)
    for size in SIZES
}
pd.DataFrame(
    {
        "context where cache = weights (batch 1)": {
            s: f"{n:,}" for s, n in even.items()
        },
        "same at batch 32": {s: f"{n // 32:,}" for s, n in even.items()},
    }
)

# %%
assert 80_000 < even["0.5B"] < 81_000 and 265_000 < even["7B"] < 266_000
