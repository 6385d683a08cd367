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
# `pipeline("text-generation")` wrapped the prompt in a chat template, turned it into token ids, ran
# `model.generate` with a mix of defaults, and decoded the new ids back into text. Can we do each step ourselves,
# with only the two classes underneath (`AutoTokenizer` and `AutoModelForCausalLM`) and a loop of a dozen lines,
# and get the golden reference token for token?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - what the {term}`chat template` adds to a message, and the special tokens that frame a turn;
# - which of the checkpoint's generation defaults a greedy loop must honour: the {term}`repetition penalty` and
#   the {term}`EOS` tokens;
# - the generate loop itself, forward, {term}`logits`, penalty, argmax, append, stop, written out by hand;
# - why one forward pass over a finished reference checks every step of the loop at once;
# - what the naive loop costs, and what a {term}`KV cache` will save.
#
# **You need** the golden references and the settings rule of {doc}`01_pipeline`. Running it takes the
# embedded model, under a minute on a laptop CPU.
# ```

# %% tags=["hide-input", "nbval-ignore-output"]
# %matplotlib inline
from figures import explicit_loop as figures
from helpers import (
    DEVICE,
    DTYPE,
    agree_up_to_a_near_tie,
    golden_applies,
    load_golden,
    model_path,
    stamp,
    tolerance,
)

import textwrap
import time

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minqwen.engine.sampling import apply_repetition_penalty

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
# ends with an open assistant turn, so the model's continuation *is* the answer. Note the system message we
# never wrote: Qwen's template inserts one when the conversation has none.

# %%
references = load_golden()
by_name = {r["name"]: r for r in references}
messages = by_name["chinese"]["messages"]
print(
    tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
)

# %% [markdown]
# Tokenized, the chat markers (and `<|endoftext|>`) are single tokens of their own, and the ids are exactly the reference's prompt:

# %%
prompt_ids = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True
)["input_ids"]
special = {
    t: tokenizer.convert_tokens_to_ids(t)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
}
print(textwrap.fill(f"{len(prompt_ids)} ids: {prompt_ids}", 96))
print(special)
assert (
    prompt_ids[0] == special["<|im_start|>"]
    and prompt_ids == by_name["chinese"]["prompt_ids"]
)

# %% [markdown]
# ## Step 2: the defaults a greedy loop must honour
#
# `model.generate()` (and so the pipeline) takes every setting it is not given from the checkpoint's
# `generation_config.json`:

# %%
model.generation_config.to_diff_dict()

# %% [markdown]
# The references were recorded with `do_sample=False` and nothing else, so for our loop to give their tokens each
# of these is either switched off by that one override, or honoured:
#
# ```{list-table}
# :header-rows: 1
# :widths: 22 22 56
#
# * - setting
#   - value
#   - what our greedy loop does
# * - `do_sample`
#   - `True`
#   - argmax instead of a random draw (`do_sample=False`), so temperature, top-k and top-p play no part
# * - `repetition_penalty`
#   - 1.05
#   - applies it, as transformers' greedy search does: the references were recorded with it
# * - `eos_token_id`
#   - `[151645, 151643]`
#   - stops on either: `<|im_end|>` ends a turn, `<|endoftext|>` a document
# * - `pad_token_id`
#   - 151643
#   - nothing: one sequence needs no padding
# ```

# %%
eos_ids = model.generation_config.eos_token_id
penalty = model.generation_config.repetition_penalty
assert eos_ids == [special["<|im_end|>"], special["<|endoftext|>"]]
print(f"eos_ids {eos_ids}, repetition penalty {penalty}")

# %% [markdown]
# ## Step 3: the loop
#
# A causal language model maps a sequence of ids to logits at every position; the logits at the last position
# score every possible next token. Before the pick, the repetition penalty lowers the score $z_i$ of every token
# $i$ already in the sequence (prompt included, each token once however often it occurred):
#
# $$
# z_i \leftarrow \begin{cases} z_i / \theta & z_i > 0 \\ z_i \, \theta & z_i \le 0 \end{cases}
# \qquad \text{for every token } i \text{ in the sequence}, \quad \theta = 1.05.
# $$
#
# Greedy decoding then takes the highest score, appends it, and asks again, feeding the **whole** sequence each
# time. That is deliberately naive: step $t$ recomputes everything steps $1, \dots, t-1$ already computed, the
# waste the KV cache of chapter 4 removes. The figure shows the cycle, labelled with what the first step on the
# Chinese prompt held.


# %%
def greedy_loop(model, prompt_ids, max_new_tokens, eos_ids, penalty):
    ids = torch.tensor([prompt_ids], device=DEVICE)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(ids).logits[0, -1].float()  # every position recomputed
            seen = logits[ids[0]]  # the scores of the tokens already in the sequence
            logits[ids[0]] = torch.where(seen > 0, seen / penalty, seen * penalty)
            next_id = logits.argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() in eos_ids:
                break
    return ids[0].tolist()


# %% tags=["hide-input"]
with torch.inference_mode():
    first_logits = (
        model(torch.tensor([prompt_ids], device=DEVICE)).logits[0, -1].float()
    )
seen_ids = torch.tensor([prompt_ids], device=DEVICE)
first_penalised = apply_repetition_penalty(first_logits[None], seen_ids, penalty)[0]
winner, plain = int(first_penalised.argmax()), int(first_logits.argmax())
figures.generate_loop(
    {
        "prompt": len(prompt_ids),
        "vocab": first_logits.shape[-1],
        "seen": len(set(prompt_ids)),
        "penalty": penalty,
        "winner": winner,
        "runner": "the same without the penalty"
        if winner == plain
        else f"without the penalty: id {plain}",
        "eos": eos_ids,
        "steps": len(by_name["chinese"]["output_ids"]) - len(prompt_ids),
        "stopped": f"on id {by_name['chinese']['output_ids'][-1]}, "
        f"{tokenizer.decode(by_name['chinese']['output_ids'][-1])}",
    }
)

# %% [markdown]
# The two penalty lines of the loop are teaching code; minqwen's `apply_repetition_penalty` is the version the
# book's engine uses. On the real logits of that first step they give the same scores, bit for bit:

# %%
seen = first_logits[seen_ids[0]]
by_hand = first_logits.clone()
by_hand[seen_ids[0]] = torch.where(seen > 0, seen / penalty, seen * penalty)
print(f"equal to minqwen's: {torch.equal(by_hand, first_penalised)}")
assert torch.equal(by_hand, first_penalised)

# %% [markdown]
# The Chinese reference is the one that ends on its own, so the loop exercises the stop on EOS.

# %% tags=["nbval-ignore-output"]
start = time.perf_counter()
loop_ids = greedy_loop(
    model, prompt_ids, by_name["chinese"]["max_new_tokens"], eos_ids, penalty
)
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
    assert by_name["chinese"]["repetition_penalty"] == penalty
    assert loop_ids == by_name["chinese"]["output_ids"], (
        "the hand-written loop differs from the golden reference"
    )
    assert text == by_name["chinese"]["text"]

# %% [markdown]
# On another model than the book's the golden files do not apply; the folded cell then compares the loop with
# HF's `generate` given the same settings.

# %% tags=["hide-input"]
if (
    not golden_applies()
):  # another model: the reference is HF generate with the same settings
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt_ids], device=DEVICE),
            attention_mask=torch.ones(
                1, len(prompt_ids), dtype=torch.long, device=DEVICE
            ),
            do_sample=False,
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
# cheaper check that proves the same thing. Step $t$ of the loop computed the logits at position
# $p + t - 1$ (for a prompt of $p$ tokens) from the first $p + t$ tokens only, and a causal model's output at a
# position does not depend on anything after it. So one forward pass over a whole reference gives, at every
# position, the logits that step of the loop saw; penalising each with the tokens before it, the loop reproduces
# the reference exactly when each argmax is the token the reference holds next.

# %%
rows = []
for r in references:
    ids = torch.tensor([r["output_ids"]], device=DEVICE)
    start = len(r["prompt_ids"])
    with torch.inference_mode():
        logits = model(ids).logits[0, start - 1 : -1].float()
    scores = torch.cat(
        [
            apply_repetition_penalty(
                logits[t : t + 1], ids[:, : start + t], r["repetition_penalty"]
            )
            for t in range(len(logits))
        ]
    )
    expected = r["output_ids"][start:]
    rows.append(
        {
            "reference": r["name"],
            "new tokens": len(expected),
            "argmax = reference": sum(scores.argmax(-1).cpu().numpy() == expected),
            "without the penalty": sum(logits.argmax(-1).cpu().numpy() == expected),
        }
    )
check = pd.DataFrame(rows).set_index("reference")
print(
    f"{check['argmax = reference'].sum()}/{check['new tokens'].sum()} steps: "
    "the penalised argmax is the reference's next token"
)
if golden_applies():
    assert (check["argmax = reference"] == check["new tokens"]).all()

# %% [markdown]
# Every step checks (the full table is folded below). Its last column is the negative control: without the
# penalty the argmax misses some of the English reference's tokens, the steps where the penalty flipped the
# winner, so the check would catch a loop that forgot it.

# %% tags=["remove-input", "hide-output"]
check

# %%
if golden_applies():
    assert (check["without the penalty"] < check["new tokens"]).any()

# %% [markdown]
# ## What the naive loop costs
#
# Each step feeds the whole sequence, so generating $n$ tokens after a prompt of $p$ processes
#
# $$
# \sum_{t=0}^{n-1} (p + t) = np + \frac{n(n-1)}{2}
# $$
#
# positions, against $p + n - 1$ for a loop that remembers its past (chapter 4): quadratic in the length
# instead of linear.

# %% tags=["hide-input"]
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

# %% [markdown]
# ## Summary
#
# - The chat template frames each turn with `<|im_start|>role` and `<|im_end|>`, adds a default system message,
#   and ends with an open assistant turn.
# - Greedy decoding with the checkpoint's settings is: forward, take the last position's logits, apply the
#   repetition penalty to every token seen, argmax, append, stop on either EOS token.
# - That loop, a dozen lines, reproduces the golden reference token for token.
# - A causal model's logits at a position ignore what follows, so one forward pass over a reference checks every
#   step of the loop at once.
# - The naive loop recomputes the whole sequence each step, a cost quadratic in the length.
#
# ## Exercises
#
# ````{exercise}
# :label: explicit-loop-causal
# Check the claim the one-pass test rests on: change the *last* token of the English reference and show that the
# logits at every earlier position do not move.
# ````
#
# ```{solution-start} explicit-loop-causal
# :class: dropdown
# ```

# %%
ids = torch.tensor([by_name["english"]["output_ids"]], device=DEVICE)
changed = ids.clone()
changed[0, -1] = special["<|endoftext|>"]
with torch.inference_mode():
    a, b = model(ids).logits[0], model(changed).logits[0]
earlier, last = (a[:-1] - b[:-1]).abs().max(), (a[-1] - b[-1]).abs().max()
print(f"earlier positions: max |difference| {earlier:.1e}; last position: {last:.1e}")
assert earlier <= tolerance("forward") * a.abs().max() and last > 0

# %% [markdown]
# Only the last position sees the last token; every earlier row of the output is the same (up to rounding, at
# most, from the different input).
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: explicit-loop-eos
# What would the model write after `<|im_end|>` if the loop did not stop? Run `greedy_loop` on the Chinese prompt
# with no end tokens and four steps more than the reference took.
# ````
#
# ```{solution-start} explicit-loop-eos
# :class: dropdown
# ```

# %%
steps = len(by_name["chinese"]["output_ids"]) - len(prompt_ids)
no_stop = greedy_loop(model, prompt_ids, steps + 4, eos_ids=[], penalty=penalty)
print(repr(tokenizer.decode(no_stop[len(prompt_ids) :])))
same = min(
    len(no_stop), len(loop_ids)
)  # the loop above stopped on EOS, or ran out of steps
assert no_stop[:same] == loop_ids[:same]

# %% [markdown]
# Up to the end of the turn the text is the same; after it, the model carries on with whatever a conversation
# looks like after an assistant turn. The end tokens are where the model says it is done; without them nothing
# else would stop it before `max_new_tokens`.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: explicit-loop-cost
# A chat of 1,000 prompt tokens gets a 500-token reply. How many positions does the naive loop process, how many
# with a cache, and at what reply length does the naive loop cost 100 times more?
# ````
#
# ```{solution-start} explicit-loop-cost
# :class: dropdown
# ```


# %%
def positions(p, n):
    return n * p + n * (n - 1) // 2, p + n - 1


naive, cached = positions(1000, 500)
print(f"naive {naive:,}, cached {cached:,}, ratio {naive / cached:.0f}")
n = next(
    n for n in range(1, 10**5) if positions(1000, n)[0] >= 100 * positions(1000, n)[1]
)
print(f"100x from a reply of {n} tokens")
assert naive == sum(range(1000, 1500))

# %% [markdown]
# At the start of a reply the naive loop processes about $p$ positions per token against one, and the ratio only
# grows. That is what chapter 4's KV cache is for.
#
# ```{solution-end}
# ```
