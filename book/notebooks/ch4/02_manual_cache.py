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
# # A KV cache of our own
#
# {doc}`01_hf_cache` took transformers' cache apart. Here minqwen gets its own, in two versions: one that grows
# as it goes, like `DynamicCache`, and one preallocated for a fixed number of positions, the shape that compiled
# and graph-captured decoders need. With a cache, the generation loop becomes a {term}`prefill` of the prompt,
# then one {term}`decode` step per token at a position offset by what the cache holds. The cache must change the
# cost of a step and nothing else: how do we know it does?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how a {term}`KV cache` plugs into attention (one line) and into the model (the positions);
# - the difference between a growing cache and a preallocated one, and why fast decoders want the second;
# - how to show that the cached loop gives the tokens of every other loop: chapter 1's, HF's `generate()`, and
#   the golden references;
# - what the cache buys in time per step, and what it costs in memory.
#
# **You need** the prefill and decode phases and `DynamicCache` from {doc}`01_hf_cache`, the generation loop and
# sampling settings of {doc}`../ch1/02_explicit_loop` and {doc}`../ch1/03_sampling`, and minqwen's model from
# {doc}`../ch3/06_model`. Running it takes the embedded model (about a minute on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import manual_cache as figures
from helpers import (
    DEVICE,
    DTYPE,
    agree_up_to_a_near_tie,
    diff_stats,
    diff_table,
    golden_applies,
    hf_model,
    load_golden,
    model_path,
    show_source,
    tokenizer,
    tolerance,
)

import time

import torch

import minqwen
from minqwen import DynamicKVCache, StaticKVCache
from minqwen.model.sizes import kv_cache_bytes_per_token
from minqwen.tools.hf_adapter import HFAdapter

ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
hf, tok = hf_model(), tokenizer()
config = ours.config
messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "List three uses of a hash map."},
]
prompt = tok.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt"
)["input_ids"].to(DEVICE)
print(f"prompt: {prompt.shape[1]} tokens")

# %% [markdown]
# ## The growing cache
#
# `DynamicKVCache` keeps one key and one value tensor per layer, shaped `[batch, kv_heads, seq, head_dim]` as in
# transformers. `update(layer, k, v)` appends the new positions and returns everything stored so far, which is
# what that layer's attention needs. The model advances `length` after the last layer.

# %%
show_source(DynamicKVCache)

# %% [markdown]
# The attention layer needs one extra line: the new keys and values go into the cache, and attention runs over
# what comes back.

# %%
show_source(minqwen.model.layers.Attention.forward)

# %% [markdown]
# The model passes the cache to every layer. Without explicit positions it numbers the new tokens from
# `cache.length` on, so a decode step's single token lands at position `past`, not 0.

# %%
show_source(minqwen.Qwen2.forward)

# %% [markdown]
# ## Prefill, then decode one token at a time
#
# The loop below prefills the prompt and then decodes 8 greedy tokens, writing each step's positions out in full:
# `cache.length + arange(new tokens)`. The first pass feeds the whole prompt; every later pass feeds the one
# token just chosen.


# %%
def prefill_then_decode(model, prompt, cache, steps):
    """Greedy tokens, and each step's logits at the position it fed last."""
    ids, logits, step_ids = prompt, [], prompt
    with torch.inference_mode():
        for _ in range(steps + 1):
            positions = cache.length + torch.arange(step_ids.shape[1], device=DEVICE)
            step_logits = model(step_ids, position_ids=positions[None], cache=cache)
            logits.append(step_logits[:, -1])
            step_ids = step_logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step_ids], dim=1)
    return ids[:, :-1], torch.stack(logits[:-1], dim=1)


steps = 8
cache = DynamicKVCache(config.num_hidden_layers)
ids, step_logits = prefill_then_decode(ours, prompt, cache, steps)
print(
    f"cache holds {cache.length} positions; layer 0 keys {tuple(cache.keys[0].shape)}"
)
print(repr(tok.decode(ids[0, prompt.shape[1] :])))

# %% [markdown]
# One uncached forward pass over the whole final sequence must give the same logits at the same positions:

# %%
with torch.inference_mode():
    full = ours(ids)[:, prompt.shape[1] - 1 : -1]
error = diff_stats(step_logits, full)["max_rel"]
print(
    f"prefill + {steps} decode steps against one uncached forward: "
    f"max relative error {error:.1e}"
)
assert error <= tolerance("forward")
assert cache.length == ids.shape[1]
assert cache.keys[0].shape == (
    1,
    config.num_key_value_heads,
    ids.shape[1],
    config.head_dim,
)

# %% tags=["remove-input", "hide-output"]
diff_table({"prefill + 8 decode steps vs one uncached forward": (step_logits, full)})

# %% [markdown]
# ## The preallocated cache
#
# `torch.cat` allocates new storage for every layer at every step and copies the whole cache into it, so a step
# costs time in proportion to the context. `StaticKVCache` instead allocates `[layers, batch, kv_heads, max_len,
# head_dim]` once and writes each step into place. It refuses to overflow.

# %%
show_source(StaticKVCache)

# %% [markdown]
# The same decode, through a preallocated cache, gives the same tokens, and its storage never moves:

# %%
static = StaticKVCache.for_model(ours, batch=1, max_len=prompt.shape[1] + steps + 4)
storage = static.keys.data_ptr()
static_ids, static_logits = prefill_then_decode(ours, prompt, static, steps)
static_bytes = static.keys.nbytes + static.values.nbytes
print(
    f"preallocated {static_bytes:,} bytes for {static.capacity} positions; "
    f"{static.length} used; same tokens: {torch.equal(static_ids, ids)}"
)
assert torch.equal(static_ids, ids) and static.keys.data_ptr() == storage
assert diff_stats(static_logits, step_logits)["max_rel"] <= tolerance("forward")

# %% [markdown]
# Writing 5 more positions into a cache with 4 free ones fails before anything is written:

# %% tags=["hide-input"]
try:
    with torch.inference_mode():
        ours(ids[:, :5], cache=static)
except ValueError as error:
    print("ValueError:", error)
else:
    raise AssertionError("writing past the preallocated positions must fail")

# %% [markdown]
# ## The same tokens as every other loop
#
# `minqwen.generate` prefills and decodes with a `DynamicKVCache` by default (`use_cache=True`);
# `use_cache=False` keeps the naive loop, which runs the whole sequence on every step. Here are eight runs of 10
# new tokens each, in two groups.
#
# - **Greedy** (`do_sample=False`, `repetition_penalty=1.0`): the loop of chapter 1 written inline once more
#   (the whole sequence each step, argmax), `minqwen.generate` with the cache, `minqwen.generate` driving HF's
#   model through `HFAdapter`, and HF's own `generate()`.
# - **Sampled with the checkpoint's defaults** (no settings but a seed, so temperature 0.7, top-k 20, top-p 0.8
#   and repetition penalty 1.05 from `generation_config.json`): `minqwen.generate` with and without the cache,
#   on HF's model through the adapter, and HF's `generate()`.
#
# Every call gets exactly the arguments HF's `generate()` gets. The uncached `generate` joins the sampled runs,
# where a slip in the cache would change the draws too. No end token comes within 10 tokens here, so the loop of
# chapter 1, which knows none, runs the same length. (Folded: chapter 1's loop, and HF's `generate()` after
# seeding torch's generator.)


# %% tags=["hide-input"]
def chapter1_loop(model, ids, max_new_tokens):
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            next_token = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids


def hf_generate(ids, max_new_tokens, seed=None, **settings):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return hf.generate(ids, max_new_tokens=max_new_tokens, **settings)


# %%
n, greedy, seed = 10, dict(do_sample=False, repetition_penalty=1.0), 1234
runs = {
    "chapter 1 loop (greedy)": chapter1_loop(ours, prompt, n),
    "generate, cache (greedy)": minqwen.generate(ours, prompt, n, **greedy),
    "generate on HF's model (greedy)": minqwen.generate(
        HFAdapter(hf), prompt, n, **greedy
    ),
    "HF generate() (greedy)": hf_generate(prompt, n, **greedy),
    "generate, cache (sampled)": minqwen.generate(ours, prompt, n, seed=seed),
    "generate, no cache (sampled)": minqwen.generate(
        ours, prompt, n, seed=seed, use_cache=False
    ),
    "generate on HF's model (sampled)": minqwen.generate(
        HFAdapter(hf), prompt, n, seed=seed
    ),
    "HF generate() (sampled)": hf_generate(prompt, n, seed=seed),
}
new_ids = {name: out[0, prompt.shape[1] :].tolist() for name, out in runs.items()}

# %% [markdown]
# Each distinct continuation, whole, with the runs that produced it:

# %% tags=["hide-input"]
texts = {}
for name, tokens in new_ids.items():
    texts.setdefault(tok.decode(tokens), []).append(name)
for text, names in texts.items():
    print(f"{text!r}, from:")
    print("".join(f"    {name}\n" for name in names))

# %% [markdown]
# The greedy runs agree token for token, and so do the sampled runs; sampling really sampled, since the two
# groups differ. (In bfloat16, runs that round differently may part where two tokens were within rounding of
# each other: the greedy check then accepts such a split and no other, as {doc}`03_batching` explains, and of the
# sampled runs the two that share HF's forward must still agree.)

# %%
greedy_runs, sampled_runs = list(runs)[:4], list(runs)[4:]
assert all(
    agree_up_to_a_near_tie(ours, prompt, new_ids[name], new_ids[greedy_runs[0]])
    for name in greedy_runs
)
# a sampled split has no near-tie to point at: in bfloat16 only the runs on HF's forward
must_agree = sampled_runs if DTYPE == torch.float32 else sampled_runs[2:]
assert all(new_ids[name] == new_ids[must_agree[0]] for name in must_agree)
assert new_ids[greedy_runs[0]] != new_ids[sampled_runs[0]]  # sampling really sampled

# %% [markdown]
# The golden references were recorded by `pipeline()` in chapter 1, greedy with the checkpoint's repetition
# penalty, 48 new tokens each, and chapter 3 checks them in full. Here the cached loop, given the recorded
# settings, must reproduce the first 10 new tokens of each. They apply only to the model that recorded them, in
# float32, so how many are checked depends on the setup, and this cell's output is not compared between runs.

# %% tags=["nbval-ignore-output"]
golden_checked = 0
if golden_applies():
    for record in load_golden():
        prompt_ids = torch.tensor([record["prompt_ids"]], device=DEVICE)
        expected = record["output_ids"][: prompt_ids.shape[1] + n]
        out = minqwen.generate(
            ours,
            prompt_ids,
            n,
            do_sample=record["do_sample"],
            repetition_penalty=record["repetition_penalty"],
        )
        assert out[0].tolist() == expected, record["name"]
        golden_checked += 1
    assert golden_checked == len(load_golden()) > 0
print(f"golden references reproduced by the cached loop: {golden_checked}")

# %% [markdown]
# ## What the cache buys
#
# Without a cache, step $t$ runs the model over all $n + t$ tokens. With one, every step runs one token, and only
# attention's reads of the stored keys grow with the context. The cell below counts the positions each decode
# step hands the model, which is exact, and times each step, which is not: timings vary with the machine and
# whatever else runs on it, so the figure is an illustration and nothing asserts on it.

# %% tags=["hide-input", "nbval-ignore-output"]
long_prompt = tok.apply_chat_template(
    [{"role": "user", "content": "Summarise the history of computing. " * 4}],
    add_generation_prompt=True,
    return_tensors="pt",
)["input_ids"].to(DEVICE)


def step_times(use_cache, steps=8):
    """Seconds of each decode step, and the positions the model ran in each."""
    times, positions, start = [], [], time.perf_counter()
    count = ours.register_forward_pre_hook(
        lambda _, args: positions.append(args[0].shape[1])
    )
    try:
        for _ in minqwen.generate_tokens(
            ours,
            long_prompt,
            steps,
            do_sample=False,
            eos_token_id=[],
            use_cache=use_cache,
        ):
            now = time.perf_counter()
            times.append(now - start)
            start = now
    finally:
        count.remove()
    # Step 0 is the prefill, the same work in both loops.
    return times[1:], positions[1:]


(cached_times, cached_positions), (uncached_times, uncached_positions) = (
    step_times(True),
    step_times(False),
)
n = long_prompt.shape[1]
assert cached_positions == [1] * 7
assert uncached_positions == [n + t for t in range(1, 8)]
print(f"positions per decode step, with the cache: {cached_positions}")
print(f"positions per decode step, without it:     {uncached_positions}")
figures.step_times(
    cached_times,
    uncached_times,
    f"Decode step time, prompt of {long_prompt.shape[1]} tokens "
    f"({DEVICE}, {str(DTYPE).removeprefix('torch.')})",
)
median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
print(
    f"median step: {median(uncached_times) * 1e3:.0f} ms without the cache, "
    f"{median(cached_times) * 1e3:.0f} ms with it"
)

# %% [markdown]
# The price is memory. The cache grows by a fixed number of bytes per token, and the static cache reserves all of
# it up front:

# %% tags=["hide-input"]
per_token = kv_cache_bytes_per_token(config, str(DTYPE).removeprefix("torch."))
lengths = list(range(prompt.shape[1], prompt.shape[1] + steps + 1))
figures.cache_memory(lengths, per_token, static_bytes, static.capacity)
dynamic_bytes = sum(k.nbytes + v.nbytes for k, v in zip(cache.keys, cache.values))
print(
    f"{per_token:,} bytes per token; the dynamic cache holds {dynamic_bytes:,} bytes "
    f"for {cache.length} positions"
)
assert dynamic_bytes == per_token * cache.length

# %% [markdown]
# ## Summary
#
# - A KV cache plugs into attention with one line (`k, v = cache.update(layer, k, v)`), and into the model by
#   numbering new tokens from `cache.length`.
# - `DynamicKVCache` grows by concatenation and reallocates at every step; `StaticKVCache` is allocated once,
#   written in place, and refuses to overflow, which is what compiled and graph-captured decoders need.
# - The cached loop gives the logits of an uncached forward to rounding, and the same tokens as chapter 1's loop,
#   HF's model driven by minqwen's loop, HF's `generate()` and the golden references, greedy and sampled.
# - With the cache a decode step runs one token instead of the whole sequence; the price is a fixed number of
#   bytes per token of context.
#
# ## Exercises
#
# ````{exercise}
# :label: manual-cache-chunked
# A middle way between the two caches: allocate room for 16 positions at a time, write new positions in place,
# and reallocate (copying) only when a chunk is full. Write a `ChunkedKVCache` with the same interface
# (`update(layer, k, v)` and `length`), run `prefill_then_decode` through it, and check it gives the tokens and
# logits of `DynamicKVCache`. How many reallocations did it make, against `DynamicKVCache`'s one per layer and
# step?
# ````
#
# ```{solution-start} manual-cache-chunked
# :class: dropdown
# ```


# %%
class ChunkedKVCache:
    def __init__(self, num_layers, chunk=16):
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.length, self.chunk, self.reallocations = 0, chunk, 0

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is None or end > old_k.shape[2]:
            room = -(-end // self.chunk) * self.chunk  # round up to whole chunks
            shape = (*k.shape[:2], room, k.shape[3])
            new_k, new_v = k.new_zeros(shape), v.new_zeros(shape)
            if old_k is not None:
                new_k[:, :, : self.length] = old_k[:, :, : self.length]
                new_v[:, :, : self.length] = old_v[:, :, : self.length]
            self.keys[layer], self.values[layer] = new_k, new_v
            self.reallocations += 1
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


chunked = ChunkedKVCache(config.num_hidden_layers)
chunked_ids, chunked_logits = prefill_then_decode(ours, prompt, chunked, steps)
error = diff_stats(chunked_logits, step_logits)["max_rel"]
layers = config.num_hidden_layers
print(f"same tokens: {torch.equal(chunked_ids, ids)}; max relative error {error:.1e}")
print(
    f"reallocations per layer: {chunked.reallocations // layers} chunked, "
    f"{steps + 1} dynamic (one per pass) for {chunked.length} positions"
)
assert torch.equal(chunked_ids, ids) and error <= tolerance("forward")

# %% [markdown]
# Each layer reallocates only when the length crosses a multiple of 16 (the prefill allocates the first chunks),
# where `DynamicKVCache` reallocates every layer at every pass. Doubling
# the room instead of adding a fixed chunk makes the total copying linear in the length, as a Python list does.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: manual-cache-copies
# `DynamicKVCache` copies the whole cache at every step. How many bytes does it copy in all while it generates
# 1,000 tokens after a 100-token prompt with this model, and how many would a preallocated cache write? Count
# them with a formula, then check the formula on the short decode above.
# ````
#
# ```{solution-start} manual-cache-copies
# :class: dropdown
# ```


# %%
def copied_bytes(prompt_len, new_tokens):
    """Bytes that torch.cat writes: after each decode step, the whole cache so far."""
    return sum(per_token * (prompt_len + t) for t in range(1, new_tokens + 1))


dynamic_total, static_total = copied_bytes(100, 1000), per_token * 1100
print(f"DynamicKVCache copies {dynamic_total / 2**30:.1f} GiB in all")
print(f"StaticKVCache writes {static_total / 2**20:.1f} MiB in all")
print(f"ratio: {dynamic_total / static_total:.0f}x")
# the short decode above: 8 steps after the prefill, each rewrites the whole cache
written = []
probe = DynamicKVCache(config.num_hidden_layers)
with torch.inference_mode():
    ours(prompt, cache=probe)
    for token in ids[0, prompt.shape[1] : prompt.shape[1] + steps]:
        ours(token.view(1, 1), cache=probe)
        written.append(
            sum(k.nbytes + v.nbytes for k, v in zip(probe.keys, probe.values))
        )
assert sum(written) == copied_bytes(prompt.shape[1], steps)

# %% [markdown]
# The copying grows with the square of the length, $\sum_t (n + t) \approx n T + T^2/2$ positions, while a
# preallocated cache writes each position once. At a thousand tokens the bytes moved already differ by the
# factor printed above.
#
# ```{solution-end}
# ```
