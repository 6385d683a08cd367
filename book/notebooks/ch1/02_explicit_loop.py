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
# # Behind the pipeline: a generate loop by hand
#
# `pipeline("text-generation")` did four things: it wrapped the prompt in a chat template, turned it into token
# ids, ran `model.generate` with a mix of defaults, and decoded the new ids back into text. Here we do each step
# ourselves with the two classes underneath, `AutoTokenizer` and `AutoModelForCausalLM`, and write the generation
# loop in a dozen lines. The result must be token for token the golden reference recorded in the previous chapter.

# %%
# NBVAL_IGNORE_OUTPUT
from helpers import (
    DEVICE,
    DTYPE,
    agree_up_to_a_near_tie,
    golden_applies,
    load_golden,
    model_path,
    stamp,
)

import time

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(model_path())
model = (
    AutoModelForCausalLM.from_pretrained(model_path(), dtype=DTYPE).to(DEVICE).eval()
)
print(stamp())

# %% [markdown]
# ## Step 1: the chat template
#
# An Instruct model was trained on conversations in a fixed format (ChatML): each turn is framed by
# `<|im_start|>role` and `<|im_end|>`. The tokenizer carries the template. With `add_generation_prompt=True` it
# ends with an open assistant turn, so the model's continuation *is* the answer. Note the system message we never
# wrote: Qwen's template inserts one when the conversation has none.

# %%
references = load_golden()
by_name = {r["name"]: r for r in references}
messages = by_name["chinese"]["messages"]
print(
    tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
)

# %%
prompt_ids = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True
)["input_ids"]
print(len(prompt_ids), "tokens:", prompt_ids[:8], "...", prompt_ids[-5:])
special = {
    t: tokenizer.convert_tokens_to_ids(t)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
}
print(special)
assert (
    prompt_ids[0] == special["<|im_start|>"]
    and prompt_ids == by_name["chinese"]["prompt_ids"]
)

# %% [markdown]
# ## Step 2: the defaults to override
#
# `model.generate()` (and so the pipeline) starts from the model's `generation_config.json`. For this Instruct
# model it turns sampling on, and adds a repetition penalty that applies even to greedy search:

# %%
model.generation_config.to_diff_dict()

# %% [markdown]
# For a plain greedy loop, each of these has to be neutralised or honoured explicitly:
#
# | setting | value | what our greedy loop does |
# |---|---|---|
# | `do_sample` | `True` | argmax instead of a random draw (so temperature, top-k, top-p play no part) |
# | `repetition_penalty` | 1.05 | nothing: the references were recorded with 1.0 |
# | `eos_token_id` | `[151645, 151643]` | stop on either: `<|im_end|>` ends a turn, `<|endoftext|>` a document |
# | `pad_token_id` | 151643 | nothing: one sequence needs no padding |

# %%
eos_ids = model.generation_config.eos_token_id
assert eos_ids == [special["<|im_end|>"], special["<|endoftext|>"]]

# %% [markdown]
# ## Step 3: the loop
#
# A causal language model maps a sequence of ids to logits at every position; the logits at the last position
# score every possible next token. Greedy decoding takes the highest, appends it, and asks again, feeding the
# **whole** sequence each time. That is deliberately naive: step *t* recomputes everything steps 1..*t*-1 already
# computed, which is the waste the KV cache of chapter 4 removes.


# %%
def greedy_loop(
    model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]
) -> list[int]:
    ids = torch.tensor([prompt_ids], device=DEVICE)
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            logits = model(
                ids
            ).logits  # [1, seq, vocab]: every position, recomputed every step
        next_id = logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if next_id.item() in eos_ids:
            break
    return ids[0].tolist()


# %% [markdown]
# The Chinese reference is the one that ends on its own, so the loop exercises the stop on EOS.

# %%
# NBVAL_IGNORE_OUTPUT
start = time.perf_counter()
loop_ids = greedy_loop(model, prompt_ids, by_name["chinese"]["max_new_tokens"], eos_ids)
seconds = time.perf_counter() - start
print(f"{len(loop_ids) - len(prompt_ids)} new tokens in {seconds:.1f} s")

# %% [markdown]
# ## Step 4: decode, and compare with the reference

# %%
new_ids = loop_ids[len(prompt_ids) :]
text = tokenizer.decode(new_ids, skip_special_tokens=True)
print(text)
print("last token:", tokenizer.decode(new_ids[-1]))
if golden_applies():
    assert loop_ids == by_name["chinese"]["output_ids"], (
        "the hand-written loop differs from the golden reference"
    )
    assert text == by_name["chinese"]["text"]
else:  # another model: the reference is HF generate with the same explicit settings
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt_ids], device=DEVICE),
            attention_mask=torch.ones(
                1, len(prompt_ids), dtype=torch.long, device=DEVICE
            ),
            do_sample=False,
            repetition_penalty=1.0,
            max_new_tokens=by_name["chinese"]["max_new_tokens"],
        )
    prompt_tensor = torch.tensor([prompt_ids], device=DEVICE)
    assert agree_up_to_a_near_tie(
        model,
        prompt_tensor,
        loop_ids[len(prompt_ids) :],
        expected[0, len(prompt_ids) :].tolist(),
    )
if golden_applies() or DTYPE == torch.float32:
    print(
        "token-identical with",
        "the golden reference" if golden_applies() else "HF generate",
    )
else:
    print("equal to HF generate, or parted from it only at a near-tie")

# %% [markdown]
# ## All references in one forward pass
#
# Running the loop on the two 48-token references as well would mostly recompute what is known. There is a
# cheaper check that proves the same thing. Step *t* of the loop computed the logits at position
# `prompt + t - 1` from the first `prompt + t` tokens only, and a causal model's output at a position does not
# depend on anything after it. So one forward pass over a whole reference gives, at every position, the logits
# that step of the loop saw; the loop reproduces the reference exactly when each of those argmaxes is the token
# the reference holds next.

# %%
rows = []
for r in references:
    ids = torch.tensor([r["output_ids"]], device=DEVICE)
    start = len(r["prompt_ids"])
    with torch.inference_mode():
        logits = model(ids).logits[0]
    predicted = logits[start - 1 : -1].argmax(dim=-1).tolist()
    expected = r["output_ids"][start:]
    matches = sum(p == e for p, e in zip(predicted, expected))
    rows.append(
        {
            "reference": r["name"],
            "new tokens": len(expected),
            "argmax = reference": matches,
        }
    )
check = pd.DataFrame(rows).set_index("reference")
check

# %%
if golden_applies():
    assert (check["argmax = reference"] == check["new tokens"]).all()

# %% [markdown]
# ## What the naive loop costs
#
# Each step feeds the whole sequence, so generating *n* tokens after a prompt of *p* processes
# p + (p+1) + ... + (p+n-1) positions, against p + n - 1 for a loop that remembers its past (chapter 4).

# %%
cost = pd.DataFrame(
    [
        {
            "reference": r["name"],
            "prompt": len(r["prompt_ids"]),
            "new": len(r["output_ids"]) - len(r["prompt_ids"]),
        }
        for r in references
    ]
).set_index("reference")
cost["positions, naive loop"] = [
    sum(range(p, p + n)) for p, n in zip(cost["prompt"], cost["new"])
]
cost["positions, with a cache"] = cost["prompt"] + cost["new"] - 1
cost["ratio"] = (cost["positions, naive loop"] / cost["positions, with a cache"]).round(
    1
)
cost
