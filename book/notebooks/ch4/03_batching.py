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
# # Batching: several prompts at once
#
# A {term}`decode` step for one sequence reads every weight once to produce one token. The same read could produce
# a token for each of several sequences: batching is how a server turns memory bandwidth into throughput. But
# prompts differ in length, and a batch is one rectangular tensor. The short prompts must be padded, and the model
# must behave as if the padding were not there: each row must generate exactly what its prompt would generate
# alone. What makes that work, and how do we check it?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - why decoder-only generation pads on the left ({term}`left padding`), and what the padding mask and the
#   positions of a padded batch look like;
# - the {term}`attention mask` the model builds from them: causal, minus the padding keys;
# - that each row of a padded batch generates what its prompt generates alone, and what HF's `generate()` does
#   on the same batch, greedy and sampled;
# - which inputs the loop refuses, and what right padding would have done.
#
# **You need** the cached loop of {doc}`02_manual_cache`, the causal mask of {doc}`../ch2/01_architecture`, and
# positions and RoPE from {doc}`../ch3/02_rope`. Running it takes the embedded model (about a minute on a laptop
# CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import batching as figures
from helpers import (
    DEVICE,
    DTYPE,
    agree_up_to_a_near_tie,
    diff_stats,
    hf_model,
    is_book_model,
    model_path,
    show_source,
    tokenizer,
    tolerance,
)

import pandas as pd
import torch

import minqwen
from minqwen import DynamicKVCache
from minqwen.model.qwen2 import positions_from_mask

ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
hf, tok = hf_model(), tokenizer()
questions = [
    "What is 7 times 8?",
    "Name a sorting algorithm that runs in O(n log n).",
    "用一个词形容大海。",
]
texts = [
    tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
    )
    for q in questions
]

# %% [markdown]
# ## Left padding, the mask and the positions
#
# Three things make a padded batch behave:
#
# - **left padding**: the padding goes before each prompt, so every row's newest token sits in the last column,
#   and the next token of every row is appended in the same place;
# - **a padding mask** (`attention_mask`): 1 for a real token, 0 for padding, so no query attends to a padding
#   key;
# - **positions from the mask**: each row counts its own real tokens, so its first real token is at position 0
#   however much padding precedes it, exactly as when the prompt runs alone.
#
# The tokenizer pads on the left when asked:

# %%
batch = tok(texts, return_tensors="pt", padding=True, padding_side="left").to(DEVICE)
ids, mask = batch["input_ids"], batch["attention_mask"]
positions = positions_from_mask(mask)
print(
    f"batch {tuple(ids.shape)}; prompt lengths {mask.sum(1).tolist()}; "
    f"pad id {tok.pad_token_id}"
)

# %% [markdown]
# Drawn as a grid, one row per prompt (in the order of the table below) and one column per position of the batch
# tensor, with each real token's position written in (every fifth): the padding sits on the left, every prompt ends in the last column, and each
# row's positions start at 0 where its real tokens start.

# %% tags=["hide-input"]
figures.padded_batch(
    mask,
    positions,
    [f"row {r}: {int(mask[r].sum())} tokens" for r in range(len(questions))],
)

# %% [markdown]
# The positions come from a cumulative sum of the mask:

# %%
show_source(positions_from_mask)

# %% tags=["hide-input"]
pd.DataFrame(
    [
        {
            "prompt": question,
            "real tokens": int(mask[r].sum()),
            "padding": int((mask[r] == 0).sum()),
            "first real column": int(mask[r].argmax()),
            "its position": int(positions[r, mask[r].argmax()]),
            "last column's position": int(positions[r, -1]),
        }
        for r, question in enumerate(questions)
    ]
).set_index("prompt")

# %%
for r in range(ids.shape[0]):
    real = mask[r].bool()
    assert positions[r, real].tolist() == list(range(int(real.sum())))
assert (mask[:, -1] == 1).all() and mask[:, 0].tolist().count(1) == 1

# %% [markdown]
# ## The attention mask of a padded row
#
# The model turns the padding mask into a boolean attention mask: the causal mask, minus the padding keys. A
# padding query would then see no key at all and turn softmax into 0/0, so it is allowed to see itself; its output
# is never used.

# %%
show_source(minqwen.Qwen2.attention_mask)

# %% [markdown]
# For the shortest prompt, the row with the most padding, the mask looks like this: the real queries see the real
# keys at and before them, never a padding key, and each padding query sees itself only.

# %% tags=["hide-input"]
short = int(mask.sum(1).argmin())
padding = int((mask[short] == 0).sum())
allowed = minqwen.Qwen2.attention_mask(ids.shape[1], 0, mask, DEVICE)[short, 0]
figures.attention_mask(
    allowed,
    padding,
    f"Attention mask of row {short}: {padding} padding columns, then its prompt",
)
assert not allowed[padding:, :padding].any()  # no real query sees a padding key
assert allowed[:padding, :padding].equal(
    torch.eye(padding, dtype=torch.bool, device=DEVICE)
)

# %% [markdown]
# ## Batched prefill: each row's last logits, as if alone
#
# The last position of every row predicts that row's next token. Computed in one padded batch, these logits equal
# those of each prompt run on its own, up to floating-point noise: a padded batch uses a different (masked)
# attention kernel and different matrix shapes.

# %%
with torch.inference_mode():
    batched_last = ours(ids, attention_mask=mask, logits_to_keep=1)[:, -1]
    alone_last = torch.cat(
        [
            ours(ids[r : r + 1, mask[r].bool()], logits_to_keep=1)[:, -1]
            for r in range(ids.shape[0])
        ]
    )
rel = diff_stats(batched_last, alone_last)["max_rel"]
print(
    f"max relative difference, batched vs alone: {rel:.1e} "
    f"(tolerance {tolerance():.0e})"
)
assert rel <= tolerance("forward")

# %% [markdown]
# ## Batched generation equals generation alone
#
# `minqwen.generate` takes the mask. It decodes all rows together with the {term}`KV cache`, extending the mask and
# the positions by one each step. A row that reaches its end token is padded until the others finish, as
# transformers does, with the `pad_token_id` of the checkpoint's `generation_config.json`; the checks compare each
# row up to its end token, where its own tokens stop.
#
# {term}`Greedy <greedy decoding>` decoding (`do_sample=False`, with the checkpoint's repetition penalty) must give
# each row the same tokens as its prompt alone. In float32 they are equal exactly, on the CPU and on a GPU. In
# bfloat16 a padded batch rounds differently from a row alone, so a row may part ways where its two best tokens
# were within rounding of each other (`MINQWEN_DTYPE=bfloat16` with random weights, whose logits are nearly flat,
# shows it); `agree_up_to_a_near_tie` accepts such a split, and no other.


# %% tags=["hide-input"]
def new_tokens_of(row):
    """A row's new tokens up to its first end token (after it, only padding)."""
    new = row[ids.shape[1] :].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))]


eos_ids = set(ours.config.eos_token_ids)

# %%
n = 12
batched = minqwen.generate(ours, ids, n, attention_mask=mask, do_sample=False)
rows = []
for r, question in enumerate(questions):
    prompt = ids[r : r + 1, mask[r].bool()]
    alone = minqwen.generate(ours, prompt, n, do_sample=False)[0, prompt.shape[1] :]
    alone = alone.tolist()
    assert agree_up_to_a_near_tie(ours, prompt, new_tokens_of(batched[r]), alone), r
    rows.append(
        {
            "prompt": question,
            "batched = alone": new_tokens_of(batched[r]) == alone,
            "answer": tok.decode(alone, skip_special_tokens=True),
        }
    )
print(f"{sum(row['batched = alone'] for row in rows)}/{len(rows)} rows equal to alone")

# %% tags=["hide-input"]
pd.DataFrame(rows).set_index("prompt")

# %% [markdown]
# HF's `generate()` on the same padded batch, called with the same arguments, gives the same rows:

# %%
with torch.inference_mode():
    reference = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
same = [new_tokens_of(a) == new_tokens_of(b) for a, b in zip(batched, reference)]
print(f"{sum(same)}/{len(same)} rows equal to HF generate()'s on the same batch")
assert all(
    agree_up_to_a_near_tie(
        ours,
        ids[r : r + 1, mask[r].bool()],
        new_tokens_of(batched[r]),
        new_tokens_of(reference[r]),
    )
    for r in range(len(questions))
)

# %% [markdown]
# ## Sampling in a batch
#
# With sampling, a batch draws one `torch.multinomial` over all rows per step, so row $r$ gets different random
# numbers than it would alone. Batched sampling therefore does not equal single sampling, in transformers or here.
# It does equal HF's `generate()` on the same batch with the same seed. With no settings, both sample with the
# checkpoint's defaults:

# %%
sampled = minqwen.generate(ours, ids, n, attention_mask=mask, seed=0)
torch.manual_seed(0)
with torch.inference_mode():
    hf_sampled = hf.generate(ids, attention_mask=mask, max_new_tokens=n)
assert all(new_tokens_of(a) == new_tokens_of(b) for a, b in zip(sampled, hf_sampled))
for r in range(ids.shape[0]):
    print(
        f"row {r}: {tok.decode(sampled[r, ids.shape[1] :], skip_special_tokens=True)!r}"
    )

# %% [markdown]
# ## What the loop refuses
#
# Right padding would put padding between a prompt and its continuation, so the loop rejects it before running
# anything (the exercises show what it would do). It also rejects a mask of the wrong shape, an empty batch and a
# request longer than the model's context:

# %% tags=["hide-input"]
right = tok(texts, return_tensors="pt", padding=True, padding_side="right").to(DEVICE)
bad_inputs = {
    "right padding": lambda: minqwen.generate(
        ours, right["input_ids"], 4, attention_mask=right["attention_mask"]
    ),
    "mask shape": lambda: minqwen.generate(ours, ids, 4, attention_mask=mask[:, 1:]),
    "empty batch": lambda: minqwen.generate(ours, ids[:0], 4, attention_mask=mask[:0]),
    "too long": lambda: minqwen.generate(
        ours, ids, ours.config.max_position_embeddings, attention_mask=mask
    ),
}
for name, call in bad_inputs.items():
    try:
        call()
    except ValueError as error:
        print(f"{name:14} ValueError: {error}")
    else:
        raise AssertionError(f"{name} was accepted")

# %% [markdown]
# ## Summary
#
# - A batch of prompts of different lengths is padded **on the left**, so every row's next token goes in the same
#   last column.
# - The padding mask hides the padding keys from every query, and the positions count real tokens only, so each
#   row's first token is at position 0.
# - The model's attention mask is causal minus the padding keys; a padding query sees only itself.
# - Each row of a padded batch generates what its prompt generates alone (exactly in float32, up to a near-tie in
#   bfloat16), and what HF's `generate()` gives for the same batch, greedy and sampled with a seed.
# - Sampling in a batch draws for all rows at once, so a row's samples differ from those it would draw alone.
#
# ## Exercises
#
# ````{exercise}
# :label: batching-right-padding
# Why not pad on the right? `minqwen.generate` refuses, so write the naive loop yourself: pad the batch on the
# right, prefill it with its mask, and then, like a left-padded batch, append each row's argmax of the **last
# column** and feed it back for 6 steps. Compare each row's tokens with its prompt alone. Which rows go wrong, and
# why?
# ````
#
# ```{solution-start} batching-right-padding
# :class: dropdown
# ```

# %%
right_ids, right_mask = right["input_ids"], right["attention_mask"]
cache, step_ids, step_mask = (
    DynamicKVCache(ours.config.num_hidden_layers),
    right_ids,
    right_mask,
)
step_positions, out = positions_from_mask(right_mask), []
with torch.inference_mode():
    for _ in range(6):
        logits = ours(step_ids, step_mask, step_positions, cache)[:, -1]
        step_ids = logits.argmax(
            -1, keepdim=True
        )  # read at the last column, as if left-padded
        out.append(step_ids)
        step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
        step_positions = step_positions[:, -1:] + 1
naive = torch.cat(out, dim=1)
for r in range(len(questions)):
    prompt = right_ids[r : r + 1, right_mask[r].bool()]
    alone = minqwen.generate(ours, prompt, 6, do_sample=False, repetition_penalty=1.0)
    alone = alone[0, prompt.shape[1] :]
    padded = int((right_mask[r] == 0).sum())
    print(f"row {r}, {padded} padding on the right")
    print(f"  alone:         {tok.decode(alone)!r}")
    print(f"  right-padded:  {tok.decode(naive[r])!r}")
    if padded == 0:
        assert torch.equal(naive[r], alone)
    elif is_book_model():  # random weights barely read their context
        assert not torch.equal(naive[r], alone)

# %% [markdown]
# Only the row without padding is right. In the others the last column is a padding token, so the first "next
# token" is predicted from `<|endoftext|>`, not from the prompt's last token, and every later token is appended
# after a gap of padding. Left padding puts every row's last real token in the same column, so one
# `logits[:, -1]` and one appended column serve every row.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: batching-positions
# Number the positions of the padded batch by column (`0, 1, 2, ...` in every row) instead of from the mask, keep
# the mask, and compare each row's last logits with the prompt alone. RoPE's scores depend only on the distance
# between a query and a key; what does that predict, and what do you measure?
# ````
#
# ```{solution-start} batching-positions
# :class: dropdown
# ```

# %%
columns = torch.arange(ids.shape[1], device=DEVICE).expand_as(ids)
with torch.inference_mode():
    by_column = ours(ids, attention_mask=mask, position_ids=columns, logits_to_keep=1)
for r in range(ids.shape[0]):
    error = diff_stats(by_column[r, -1], alone_last[r])["max_rel"]
    shift = int((mask[r] == 0).sum())
    print(
        f"row {r}: positions shifted by {shift:2}, max relative difference {error:.1e}"
    )
assert diff_stats(by_column[:, -1], alone_last)["max_rel"] <= tolerance("forward")

# %% [markdown]
# In exact arithmetic a shift of every position by the same amount changes nothing: the rotation of a query at
# $m + s$ and a key at $n + s$ leaves their dot product a function of $m - n$. What you measure is rounding only:
# the shifted rows rotate by other angles, whose sines and cosines round differently, so their logits move by a
# few float32 ulps, like any other reordering of the arithmetic. Positions from the mask make each row's arithmetic
# that of the prompt alone, which is what lets the greedy check above demand equality.
#
# ```{solution-end}
# ```
