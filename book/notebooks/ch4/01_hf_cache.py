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
# wasted: attention at position $t$ needs the keys and values of positions $0..t$, and those of $0..t-1$ were
# computed on the previous step and cannot have changed, because a causal model never lets an old token see a new
# one. A {term}`KV cache` keeps them. What does transformers' cache hold, how does a step use it, and what does
# it cost in memory for each Qwen2.5 size?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the two phases of cached generation: {term}`prefill` of the whole prompt, then {term}`decode` of one token
#   per step against the cache;
# - the layout of transformers' `DynamicCache`, and that the cache changes the cost of a step, not its logits;
# - why the positions of the new tokens are the caller's job, and what goes wrong when they are wrong;
# - how many bytes a token costs in the cache of every Qwen2.5 size, and when the cache outweighs the weights.
#
# **You need** the generation loop of {doc}`../ch1/02_explicit_loop`, attention and its heads from
# {doc}`../ch2/01_architecture`, and {doc}`../ch3/02_rope` and {doc}`../ch3/03_gqa` for the positions and the
# kv heads. Running it takes the embedded model (under a minute on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import hf_cache as figures
from helpers import (
    DEVICE,
    DTYPE,
    diff_stats,
    diff_table,
    hf_model,
    tokenizer,
    tolerance,
)

import pandas as pd
import torch

from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, qwen25_config
from minqwen.tools.hardware import memory_estimate

model, tok = hf_model(), tokenizer()
config = model.config
head_dim = config.hidden_size // config.num_attention_heads
messages = [{"role": "user", "content": "Explain what a KV cache is in one sentence."}]
prompt = tok.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt"
)["input_ids"].to(DEVICE)
print(
    f"prompt: {prompt.shape[1]} tokens; {config.num_hidden_layers} layers, "
    f"{config.num_key_value_heads} kv heads, head_dim {head_dim}"
)

# %% [markdown]
# ## Two phases: prefill, then decode
#
# Cached generation has two phases that do very different work. The **prefill** runs the whole prompt of $n$
# tokens through the model in one pass: every query attends to the keys at and before it (an $n \times n$ causal
# score matrix, the upper triangle masked), and the keys and values of all $n$ positions are written to the
# cache. Each **decode** step then feeds one token: its single query row is scored against the $n$ cached keys
# plus its own, it reads the $n$ cached values, and it writes one new key and value.

# %% tags=["hide-input"]
figures.prefill_and_decode(6)

# %% [markdown]
# The prefill is many tokens at once, large matrix products that keep the arithmetic units busy. A decode step
# is one token against every weight of the model, so its cost is reading the weights and the cache;
# {doc}`05_performance` measures both.
#
# ## Prefill: the cache object
#
# With `use_cache=True` the forward pass returns `past_key_values`. In transformers 5.x this is a `DynamicCache`.
# It holds one entry per layer in `cache.layers`, and each entry has `.keys` and `.values` shaped
# `[batch, kv_heads, seq, head_dim]`. (The 4.x habits, `cache[i]`, `cache.key_cache` and tuples of tuples, are
# gone.)

# %%
with torch.inference_mode():
    out = model(prompt, use_cache=True)
cache = out.past_key_values
print(type(cache).__name__, "with", len(cache.layers), "layers")
print("layer 0 keys  ", tuple(cache.layers[0].keys.shape), cache.layers[0].keys.dtype)
print("cached positions:", cache.get_seq_length())
expected = (1, config.num_key_value_heads, prompt.shape[1], head_dim)
assert len(cache.layers) == config.num_hidden_layers
assert all(layer.keys.shape == layer.values.shape == expected for layer in cache.layers)
assert cache.get_seq_length() == prompt.shape[1]

# %% [markdown]
# One key and one value per prompt token, in every layer, per kv head: the prefill has filled the cache.
#
# ## Decode: one token at a time
#
# Each decode step feeds only the newest token together with the cache. The model computes that token's key and
# value, appends them (the cache grows by one position in every layer), and attends over all positions. Five
# greedy steps:

# %%
sequence, step_logits = prompt, []
next_token = out.logits[:, -1].argmax(-1, keepdim=True)
with torch.inference_mode():
    for _ in range(5):
        sequence = torch.cat([sequence, next_token], dim=1)
        out = model(next_token, past_key_values=cache, use_cache=True)
        step_logits.append(out.logits[:, -1])
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
print(f"after 5 steps the cache holds {cache.get_seq_length()} positions")

# %% [markdown]
# The cache changes the cost of a step, not its result. The five steps' logits, computed from the cache, are
# compared with one full forward pass over the whole sequence with no cache:

# %%
with torch.inference_mode():
    full = model(sequence, use_cache=False).logits[:, -5:]
cached = torch.stack(step_logits, dim=1)
error = diff_stats(cached, full)["max_rel"]
print(f"5 cached decode steps against one uncached forward: max rel. error {error:.1e}")
assert error <= tolerance("forward")
assert cache.get_seq_length() == sequence.shape[1]

# %% tags=["remove-input", "hide-output"]
diff_table({"decode steps 1-5 vs full forward": (cached, full)})

# %% [markdown]
# The difference is rounding only, well inside the forward tolerance: the cached path multiplies one row at a
# time where the full pass multiplies all rows at once, so the sums are grouped differently.
#
# ## Positions index the cache
#
# The token fed at a decode step sits at position `past = cache.get_seq_length()`. transformers reads that number
# from the cache (`cache_position`) and rotates the new query and key by {term}`RoPE` for position `past`. The
# keys in the cache are stored **after** rotation, so a cached key never changes and nothing about earlier
# positions is recomputed. Two checks show it: the cached keys of layer 0 equal the rotated keys of a fresh
# forward pass, and feeding the last token with the wrong position (0) changes its logits. The cache itself
# carries no positions; the caller must keep them right.

# %%
with torch.inference_mode():
    fresh = model(sequence[:, :-1], use_cache=True).past_key_values
    key_error = diff_stats(cache.layers[0].keys[:, :, :-1], fresh.layers[0].keys)
    past = fresh.get_seq_length()
    at = lambda position: torch.tensor([[position]], device=DEVICE)  # noqa: E731
    right = model(sequence[:, -1:], past_key_values=fresh, position_ids=at(past)).logits
    fresh.crop(-1)  # forget the token just appended, then feed it again, at position 0
    wrong = model(sequence[:, -1:], past_key_values=fresh, position_ids=at(0)).logits
shift = (right - wrong).abs().max().item()
print(
    f"position {past} vs position 0: logits differ by up to {shift:.1f}; "
    f"next token {right.argmax().item()} vs {wrong.argmax().item()}"
)
assert key_error["max_rel"] <= tolerance("forward")
assert diff_stats(right[:, -1], full[:, -1])["max_rel"] <= tolerance("forward")
# far outside what rounding explains
assert shift > 3 * tolerance("forward") * full.abs().max().item()

# %% [markdown]
# ## What the cache costs
#
# Per token, the cache holds one key and one value vector per kv head in every layer:
#
# $$
# \text{bytes per token} = 2 \times \text{layers} \times \text{kv heads} \times \text{head dim} \times
# \text{bytes per number}.
# $$
#
# `minqwen.model.sizes.kv_cache_bytes_per_token` computes it, and the cache transformers just filled holds exactly
# that:

# %%
actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
per_token = actual / cache.get_seq_length()
dtype_name = str(DTYPE).removeprefix("torch.")
print(f"this model's cache: {per_token:,.0f} bytes per token ({dtype_name})")
assert per_token == kv_cache_bytes_per_token(config.to_dict(), dtype_name)
assert kv_cache_bytes_per_token("0.5B", "float32") == 2 * 24 * 2 * 64 * 4 == 24576
assert kv_cache_bytes_per_token("72B", "bfloat16") == 2 * 80 * 8 * 128 * 2

# %% [markdown]
# {term}`GQA` keeps the number small: Qwen2.5 has 2 to 8 kv heads against 14 to 64 query heads. For the seven
# released sizes, in bf16:

# %% tags=["hide-input"]
sizes = pd.DataFrame(
    [
        {
            "size": size,
            "layers": (c := qwen25_config(size))["num_hidden_layers"],
            "query heads": c["num_attention_heads"],
            "kv heads": c["num_key_value_heads"],
            "head_dim": c["hidden_size"] // c["num_attention_heads"],
            "KiB per token": kv_cache_bytes_per_token(size) / 1024,
        }
        for size in SIZES
    ]
).set_index("size")
sizes

# %% [markdown]
# The cache grows linearly with context length and with batch size, while the weights stay fixed. The dashed lines
# mark the bf16 weights of three sizes; where a size's line crosses its weights, the cache of one sequence weighs
# as much as the model.

# %% tags=["hide-input"]
figures.cache_growth(
    contexts=[2**k for k in range(9, 20)],
    sizes=SIZES,
    per_token={s: kv_cache_bytes_per_token(s) for s in SIZES},
    weights={s: memory_estimate(s)["weights"] for s in SIZES},
    marked=("0.5B", "7B", "72B"),
)

# %% [markdown]
# The context at which that happens, for one sequence and for a batch of 32 (which gets there 32 times sooner):

# %% tags=["hide-input"]
even = {
    size: memory_estimate(size)["weights"] // kv_cache_bytes_per_token(size)
    for size in SIZES
}
pd.DataFrame(
    [
        {
            "size": s,
            "context where cache = weights (batch 1)": f"{n:,}",
            "same at batch 32": f"{n // 32:,}",
        }
        for s, n in even.items()
    ]
).set_index("size")

# %%
assert 80_000 < even["0.5B"] < 81_000 and 265_000 < even["7B"] < 266_000

# %% [markdown]
# The smallest model is the most exposed: the 0.5B model's two kv heads are cheap, but so are its weights, so at
# batch 32 its cache outgrows the model after about 2,500 tokens of context each.
#
# ## Summary
#
# - Cached generation is a **prefill** of the whole prompt ($n \times n$ causal scores, $n$ cache slots written)
#   followed by **decode** steps of one token each (one query row against the whole cache, one slot written).
# - transformers 5.x keeps the cache in a `DynamicCache`: `cache.layers[i].keys` and `.values`, shaped
#   `[batch, kv_heads, seq, head_dim]`, stored after RoPE.
# - Decoding with the cache gives the logits of a full uncached forward, to rounding; only the cost changes.
# - The cache carries no positions: the caller must give each new token its position, and a wrong one changes
#   the logits far beyond rounding.
# - A token costs $2 \times$ layers $\times$ kv heads $\times$ head dim numbers; the cache grows with context and
#   batch, and at long contexts or large batches it outweighs the weights.
#
# ## Exercises
#
# ````{exercise}
# :label: hf-cache-gqa
# How much does grouped-query attention save? For every Qwen2.5 size, compute the bf16 cache of one sequence at
# 32k tokens of context (32,768), then the same if every query head had its own key and value head (multi-head
# attention). Use the config alone, and check your first column against `kv_cache_bytes_per_token`.
# ````
#
# ```{solution-start} hf-cache-gqa
# :class: dropdown
# ```

# %%
rows = []
for size in SIZES:
    c = qwen25_config(size)
    head = c["hidden_size"] // c["num_attention_heads"]
    gqa = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head * 2 * 32768
    mha = 2 * c["num_hidden_layers"] * c["num_attention_heads"] * head * 2 * 32768
    assert gqa == kv_cache_bytes_per_token(size) * 32768
    rows.append(
        {
            "size": size,
            "GQA GiB": gqa / 2**30,
            "MHA GiB": mha / 2**30,
            "saved": mha / gqa,
        }
    )
pd.DataFrame(rows).set_index("size").round(2)

# %% [markdown]
# The saving is the ratio of query heads to kv heads, 7x for the 0.5B and 8x for the 72B. Without GQA the 72B's
# cache of a single 32k conversation would be 80 GiB, more than an 80 GB H100 holds.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: hf-cache-two-tokens
# Nothing forces a decode step to feed one token. Prefill the prompt, then feed the next **two** tokens of
# `sequence` in one call with the cache, and check that both positions' logits equal those of the full forward
# pass. What does that say about the difference between prefill and decode?
# ````
#
# ```{solution-start} hf-cache-two-tokens
# :class: dropdown
# ```

# %%
n = prompt.shape[1]
with torch.inference_mode():
    two = model(prompt, use_cache=True).past_key_values
    both = model(sequence[:, n : n + 2], past_key_values=two).logits
    reference = model(sequence[:, : n + 2]).logits[:, n : n + 2]
error = diff_stats(both, reference)["max_rel"]
print(
    f"two tokens in one step: max relative error {error:.1e}; "
    f"cache now {two.get_seq_length()}"
)
assert error <= tolerance("forward") and two.get_seq_length() == n + 2

# %% [markdown]
# Both logits match. Prefill and decode are the same computation, "feed $k$ new tokens against what the cache
# holds", with $k = n$ and an empty cache for the prefill and $k = 1$ for a decode step. Feeding a few tokens at
# once is how chunked prefill splits a long prompt, and how speculative decoding checks several guessed tokens in
# one pass.
#
# ```{solution-end}
# ```
