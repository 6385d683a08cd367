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
# A decode step for one sequence reads every weight once to produce one token. The same read could produce a
# token for each of several sequences. Batching is how a server turns memory bandwidth into throughput. Prompts
# differ in length, though, and a batch is one rectangular tensor. So the short prompts are **padded**, and the
# model must behave as if the padding were not there. Each row must generate exactly what its prompt would
# generate alone.
#
# Three things make that work:
#
# - **left padding**: the padding goes before each prompt, so every row's newest token sits in the last column
#   and the next token is appended in the same place for all rows;
# - **an `attention_mask`**: 1 for real tokens and 0 for padding, so no query attends to a padding key;
# - **positions from the mask**: each row counts its own real tokens. The first real token is at position 0
#   however much padding precedes it, because RoPE encodes absolute positions.

# %%
from helpers import (
    DEVICE,
    DTYPE,
    agree_up_to_a_near_tie,
    hf_model,
    model_path,
    show_source,
    tokenizer,
    tolerance,
)

import pandas as pd
import torch
from transformers.utils import logging as hf_logging

import minqwen
from minqwen.model.qwen2 import positions_from_mask

hf_logging.disable_progress_bar()
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
tok = tokenizer()
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
batch = tok(texts, return_tensors="pt", padding=True, padding_side="left").to(DEVICE)
ids, mask = batch["input_ids"], batch["attention_mask"]
print(
    f"batch {tuple(ids.shape)}; prompt lengths {mask.sum(1).tolist()}; pad id {tok.pad_token_id}"
)

# %% [markdown]
# ## The mask and the positions
#
# The first columns of the batch show the padding on the left. The row with the longest prompt has none.

# %%
show_source(positions_from_mask)

# %%
positions = positions_from_mask(mask)
width = 8
pd.DataFrame(
    {
        f"row {r}": [
            f"{tok.decode([i]) if m else '<pad>'!r:14} mask {m}  pos {p}"
            for i, m, p in zip(
                ids[r, :width].tolist(),
                mask[r, :width].tolist(),
                positions[r, :width].tolist(),
            )
        ]
        for r in range(ids.shape[0])
    },
    index=[f"col {c}" for c in range(width)],
)

# %%
for r in range(ids.shape[0]):
    real = mask[r].bool()
    assert positions[r, real].tolist() == list(range(int(real.sum())))
assert (mask[:, -1] == 1).all() and mask[:, 0].tolist().count(1) == 1

# %% [markdown]
# The model turns the mask into a boolean attention mask: causal, minus the padding keys. A padding query would see
# no key at all and turn softmax into 0/0. It is allowed to see itself instead, and its output is never used.

# %%
show_source(minqwen.Qwen2.attention_mask)

# %% [markdown]
# ## Batched prefill: each row's last logits, as if alone
#
# The last position of every row predicts that row's next token. Computed in one padded batch, these logits equal
# those of each prompt run on its own, up to floating-point noise. The noise appears because a padded batch uses a
# different (masked) attention kernel and different matrix shapes.

# %%
with torch.inference_mode():
    batched_last = ours(ids, attention_mask=mask, logits_to_keep=1)[:, -1]
    alone_last = torch.cat(
        [
            ours(ids[r : r + 1, mask[r].bool()], logits_to_keep=1)[:, -1]
            for r in range(ids.shape[0])
        ]
    )
scale = alone_last.abs().max().item()
rel = ((batched_last - alone_last).abs().max().item()) / scale
print(
    f"max relative difference, batched vs alone: {rel:.1e} (tolerance {tolerance('forward'):.0e})"
)
assert rel <= tolerance("forward")

# %% [markdown]
# ## Batched generation equals generation alone
#
# `minqwen.generate` takes the mask. It decodes all rows together with the KV cache, extending the mask and the
# positions by one each step. A row that reaches its end token is padded until the others finish, as
# transformers does. Greedy decoding must give each row the same tokens as its prompt alone. So must HF's
# `generate()` on the same padded batch. Both pad a finished row with the `pad_token_id` of the checkpoint's
# `generation_config.json`; the checks compare each row up to its end token, where its own tokens stop.
#
# In float32 the rows are equal exactly, on the CPU and on a GPU. In bfloat16 a padded batch rounds differently
# from a row alone, so a row may part ways where its two best tokens were within rounding of each other
# (`MINQWEN_DTYPE=bfloat16` with random weights, whose logits are nearly flat, shows it). The check accepts such a
# split, and no other.


# %%
def new_tokens_of(row):
    """A row's new tokens up to its first end token: after it, a finished row holds only padding."""
    new = row[ids.shape[1] :].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))]


new_tokens = 12
eos_ids = set(ours.config.eos_token_ids)
batched = minqwen.generate(ours, ids, new_tokens, attention_mask=mask)
rows = []
for r, question in enumerate(questions):
    prompt = ids[r : r + 1, mask[r].bool()]
    alone = minqwen.generate(ours, prompt, new_tokens)[0, prompt.shape[1] :].tolist()
    assert agree_up_to_a_near_tie(ours, prompt, new_tokens_of(batched[r]), alone), (
        question,
        batched[r],
        alone,
    )
    rows.append(
        {
            "prompt": question,
            "tokens": len(alone),
            "batched = alone": new_tokens_of(batched[r]) == alone,
            "answer": tok.decode(alone, skip_special_tokens=True),
        }
    )
pd.DataFrame(rows)

# %%
hf = hf_model()
with torch.inference_mode():
    reference = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        temperature=None,
        top_k=None,
        top_p=None,
    )
same = [new_tokens_of(a) == new_tokens_of(b) for a, b in zip(batched, reference)]
print("minqwen's rows equal HF generate()'s on the same batch:", same)
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
# numbers than it would alone. Batched sampling therefore does not equal single sampling, in transformers or
# here. It does equal HF's `generate()` on the same batch with the same seed.

# %%
settings = dict(
    do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
)
sampled = minqwen.generate(
    ours, ids, new_tokens, attention_mask=mask, seed=0, **settings
)
torch.manual_seed(0)
with torch.inference_mode():
    hf_sampled = hf.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, **settings
    )
assert all(new_tokens_of(a) == new_tokens_of(b) for a, b in zip(sampled, hf_sampled))
for r in range(ids.shape[0]):
    print(
        f"row {r}: {tok.decode(sampled[r, ids.shape[1] :], skip_special_tokens=True)!r}"
    )

# %% [markdown]
# ## What the loop refuses
#
# Right padding would put padding between a prompt and its continuation, so the loop rejects it before running
# anything. It also rejects a mask of the wrong shape, an empty batch and a request longer than the model's
# context.

# %%
right_padded = tok(texts, return_tensors="pt", padding=True, padding_side="right").to(
    DEVICE
)
bad_inputs = {
    "right padding": lambda: minqwen.generate(
        ours,
        right_padded["input_ids"],
        4,
        attention_mask=right_padded["attention_mask"],
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
