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
# # One line: `pipeline("text-generation")`
#
# The shortest way to make Qwen2.5 write something is transformers' `pipeline`. This whole book takes that one
# line apart. We start by running it: what does it do between a chat message and the reply, which settings does
# it choose when we choose none, and what exactly does it produce? Its greedy outputs, recorded here, are the
# {term}`golden references <golden reference>` every later chapter checks itself against.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the five stages of `pipeline()`: {term}`chat template`, tokenize, generate, decode, post-process;
# - how `generate()` resolves each setting: what you pass, else `generation_config.json`, else transformers'
#   defaults, and that minqwen follows the same rule;
# - why the Instruct model samples by default, and what {term}`greedy decoding` with `do_sample=False` keeps;
# - how the golden references are recorded and re-checked on every run;
# - what turning the {term}`repetition penalty` off would change.
#
# **You need** the checkpoint folder of {doc}`../ch0/01_weights`, in particular `generation_config.json`.
# Running it takes the embedded model, about a minute on a laptop CPU.
# ```

# %% tags=["hide-input", "nbval-ignore-output"]
# %matplotlib inline
from figures import pipeline as figures
from helpers import (
    DTYPE,
    GOLDEN,
    MODEL_SOURCE,
    golden_applies,
    golden_files,
    hf_model,
    load_golden,
    model_path,
    show_source,
    stamp,
    tokenizer,
    weights_id,
)

import dataclasses
import json
import textwrap

import pandas as pd
import torch
from transformers import pipeline
from transformers.pipelines.text_generation import TextGenerationPipeline

from minqwen.engine.sampling import (
    TRANSFORMERS_DEFAULTS,
    SamplingConfig,
    apply_repetition_penalty,
)
from minqwen.model.config import ModelConfig


def wrap(text: str) -> str:
    """Long lines folded at 96 columns, so that a reader can compare texts without scrolling."""
    lines = text.split("\n")
    return "\n".join(
        line if len(line) <= 96 else textwrap.fill(line, 96) for line in lines
    )


model, tok = hf_model(), tokenizer()
generator = pipeline("text-generation", model=model, tokenizer=tok)
print(stamp())
print(MODEL_SOURCE, weights_id())

# %% [markdown]
# ## What `generate()` decides for you
#
# `generator(messages)` ends in a call to `model.generate()`, and every setting that call is not given comes
# from somewhere. transformers resolves each one in a fixed order:
#
# 1. what you pass in the call;
# 2. else the checkpoint's `generation_config.json`;
# 3. else transformers' own defaults (`do_sample=False`, `temperature=1.0`, `top_k=50`, ...).
#
# The pipeline adds one setting of its own, `max_new_tokens=256`, used when the model's file does not say; the
# rest of its column below comes from the model's file. For the
# Instruct model the second layer decides almost everything:

# %% tags=["hide-input"]
config = ModelConfig.from_file(model_path())
keys = ["max_new_tokens", *TRANSFORMERS_DEFAULTS]
nothing = dataclasses.asdict(SamplingConfig.resolve(config.sampling_defaults))
greedy = dataclasses.asdict(
    SamplingConfig.resolve(config.sampling_defaults, do_sample=False)
)
greedy = {
    k: (v if k in ("do_sample", "repetition_penalty") else "not used")
    for k, v in greedy.items()
}
figures.settings_table(
    keys,
    TRANSFORMERS_DEFAULTS,
    TextGenerationPipeline._default_generation_config.to_diff_dict(),
    model.generation_config.to_diff_dict(),
    {"call: nothing": nothing, "call: do_sample=False": greedy},
)

# %% [markdown]
# The first three columns are the layers of defaults (transformers', the pipeline's, and the checkpoint's
# `generation_config.json`); the last two are what a call resolves to. minqwen's `generate` resolves its settings with the same
# rule, in `SamplingConfig.resolve`: the caller's settings (`None` means not passed) over the checkpoint's over
# transformers' defaults. `minqwen.engine.request.prepare` calls it for every request, so `minqwen.generate(model, ids,
# n, **kw)` and `hf.generate(ids, max_new_tokens=n, **kw)` see the same settings for any `kw`.

# %%
show_source(SamplingConfig.resolve)

# %% [markdown]
# So `generator(messages)` on its own **samples** ({term}`temperature` 0.7, {term}`top-k` 20, {term}`top-p` 0.8)
# for up to 256 tokens, and every call gives a different answer unless the global random generator is seeded.
# Two seeds, twelve tokens each:

# %%
PROMPTS = {
    "code": "Write a Python function that returns the nth Fibonacci number.",
    "english": "Explain in two sentences why the sky is blue.",
    "chinese": "用三句话介绍一下长城。",
}
chat = [{"role": "user", "content": PROMPTS["code"]}]
samples = {}
for seed in (0, 1):
    torch.manual_seed(seed)
    reply = generator(chat, max_new_tokens=12)[0]["generated_text"][-1]
    samples[seed] = reply["content"]
    print(f"seed {seed}: {samples[seed]!r}")
assert samples[0] != samples[1]

# %% [markdown]
# For a reference we want {term}`greedy decoding`: at each step the single most likely token, with no
# randomness. `do_sample=False` turns sampling off, and with it temperature, top-k and top-p. It does *not* turn
# off the checkpoint's `repetition_penalty=1.05`, which transformers applies to greedy search too, and which
# the references therefore include. That is the whole recipe:

# %%
GREEDY = {"max_new_tokens": 48, "do_sample": False}

# %% [markdown]
# ## The five stages, on one prompt
#
# The pipeline returns text; asked with `return_tensors=True` it returns the token ids instead, which is what the
# later chapters need to compare exactly. Recording a reference runs the stages one by one, and checks that the
# ids the pipeline returns are the prompt's ids followed by the new ones:


# %%
def record(name: str, prompt: str) -> dict:
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    output_ids = generator(messages, return_tensors=True, **GREEDY)[0][
        "generated_token_ids"
    ]
    assert output_ids[: len(prompt_ids)] == prompt_ids
    return {
        "name": name,
        "messages": messages,
        "prompt_ids": prompt_ids,
        "output_ids": output_ids,  # prompt + new tokens, as generate() returns them
        "text": tok.decode(output_ids[len(prompt_ids) :], skip_special_tokens=True),
        **GREEDY,
        # not passed, so the checkpoint's, as in every later call that passes only do_sample=False
        "repetition_penalty": model.generation_config.repetition_penalty,
        "weights_id": weights_id(),
    }


fresh = [record(name, prompt) for name, prompt in PROMPTS.items()]

# %% [markdown]
# Here are the stages of `pipeline()` on the English prompt, each with what it produced. The chat template wraps
# the message in ChatML, adding a system message we never wrote; the tokenizer turns that text into ids; the
# generate loop appends one id per step until an {term}`EOS` token or `max_new_tokens`; decoding turns the new
# ids back into text, dropping special tokens; and the pipeline returns the conversation with the reply
# appended.

# %% tags=["hide-input"]
english = fresh[1]
new_ids = english["output_ids"][len(english["prompt_ids"]) :]
stopped = (
    f"stopped on {tok.decode(new_ids[-1])}"
    if new_ids[-1] in model.generation_config.eos_token_id
    else f"stopped at max_new_tokens = {GREEDY['max_new_tokens']}"
)
template = tok.apply_chat_template(
    english["messages"], add_generation_prompt=True, tokenize=False
)
figures.stages(
    [
        ("", "", json.dumps(english["messages"])),
        ("chat template", "apply_chat_template", template),
        (
            "tokenize",
            "tokenizer(text)",
            f"{len(english['prompt_ids'])} ids: {' '.join(map(str, english['prompt_ids']))}",
        ),
        (
            "generate loop",
            "model.generate(ids)",
            f"{len(new_ids)} new ids, {stopped}: {' '.join(map(str, new_ids))}",
        ),
        ("decode", "tokenizer.decode", english["text"]),
        (
            "post-process",
            "pipeline",
            json.dumps({"role": "assistant", "content": "(the text above)"}),
        ),
    ]
)

# %% [markdown]
# The pipeline's own post-processing gives the same reply text as our decoding, which we check on the Chinese
# prompt (the shortest):

# %%
reply = generator([{"role": "user", "content": PROMPTS["chinese"]}], **GREEDY)
greedy_text = reply[0]["generated_text"][-1]["content"]
print(greedy_text)
assert fresh[2]["text"] == greedy_text
assert tok(template).input_ids == english["prompt_ids"]

# %% [markdown]
# ## The golden references
#
# The three prompts: code, English prose and Chinese, each wrapped in the chat template.

# %% tags=["hide-input"]
end_tokens = model.generation_config.eos_token_id
pd.DataFrame(
    {
        "prompt tokens": [len(r["prompt_ids"]) for r in fresh],
        "new tokens": [len(r["output_ids"]) - len(r["prompt_ids"]) for r in fresh],
        "stopped on": [
            tok.decode(r["output_ids"][-1])
            if r["output_ids"][-1] in end_tokens
            else "max_new_tokens"
            for r in fresh
        ],
    },
    index=pd.Index([r["name"] for r in fresh], name="reference"),
)

# %%
for r in fresh:
    print(f"--- {r['name']}\n{wrap(r['text'])}\n")
if MODEL_SOURCE == "embedded":  # what the next paragraph says
    assert [r["output_ids"][-1] in end_tokens for r in fresh] == [False, False, True]

# %% [markdown]
# The Chinese answer ended by itself, on `<|im_end|>`, one of the two end tokens in `eos_token_id`; the other two
# ran into the 48-token limit.
#
# The references are written once, for the embedded model. On every later run, including CI's re-execution of
# this notebook, the fresh output must equal what is on disk, field for field; that is what makes them a
# reference rather than a snapshot. With another model (`MINQWEN_MODEL`) they do not apply and are left alone.

# %%
if golden_files() and golden_applies():
    stored = {r["name"]: r for r in load_golden()}
    assert sorted(stored) == sorted(PROMPTS), sorted(stored)
    for r in fresh:
        assert r == stored[r["name"]], (
            f"{r['name']}: the fresh pipeline output differs from the golden reference"
        )
elif not golden_files() and MODEL_SOURCE == "embedded":
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for r in fresh:
        (GOLDEN / f"{r['name']}.json").write_text(
            json.dumps(r, ensure_ascii=False, indent=1) + "\n"
        )
print("golden references:", [p.name for p in golden_files()])

# %% [markdown]
# Besides the ids and the text, each record says what it was recorded with:

# %% tags=["hide-input"]
for key, value in fresh[0].items():
    if key not in ("prompt_ids", "output_ids", "text"):
        print(f"{key}: {json.dumps(value, ensure_ascii=False)}")

# %% [markdown]
# `do_sample` false and the `repetition_penalty` say how it was decoded; `weights_id` names the weights.
#
# ## What turning the penalty off would change
#
# The penalty makes every token already in the sequence (prompt included) less likely: a positive logit $z$ is
# divided by $\theta = 1.05$, a negative one multiplied. One forward pass over a reference gives the logits every
# step of the generation saw, so we can ask at each step: with the penalty, which token wins, and without it?
# With it, the winner must be the reference's own next token; without it, the first step where the winner
# differs is where `repetition_penalty=1.0` would part ways with the reference.

# %%
steps = {}
for r in fresh:
    ids = torch.tensor([r["output_ids"]], device=model.device)
    prompt = len(r["prompt_ids"])
    with torch.inference_mode():
        logits = model(ids).logits[0, prompt - 1 : -1].float()  # what each step saw
    penalised = torch.cat(
        [
            apply_repetition_penalty(logits[t : t + 1], ids[:, : prompt + t], 1.05)
            for t in range(len(logits))
        ]
    )
    steps[r["name"]] = (logits.argmax(-1), penalised.argmax(-1))
    if golden_applies():
        assert penalised.argmax(-1).tolist() == r["output_ids"][prompt:]

# %% [markdown]
# With the penalty every argmax is the reference's next token. The first step of each reference where the
# winner without it differs (the table is built by folded code):

# %% tags=["hide-input"]
changes = []
for name, (plain, with_penalty) in steps.items():
    differ = (plain != with_penalty).nonzero()
    if len(differ):
        step = int(differ[0])
        changes.append(
            {
                "reference": name,
                "first step": step,
                "with 1.05": repr(tok.decode(int(with_penalty[step]))),
                "with 1.0": repr(tok.decode(int(plain[step]))),
            }
        )
assert changes, "the 1.05 penalty never changed the greedy choice on these prompts"
pd.DataFrame(changes).set_index("reference")

# %% [markdown]
# Where no row appears, the penalty never changed the winner and the reference would be the same without it.
# Where it did, the two decodings part at that step and the rest of the text differs. Here is the first such
# prompt, generated again by the pipeline with `repetition_penalty=1.0`, beside its reference:

# %%
first = {r["name"]: r for r in fresh}[changes[0]["reference"]]
prompt = len(first["prompt_ids"])
off = generator(
    first["messages"], return_tensors=True, **GREEDY, repetition_penalty=1.0
)
off_ids = off[0]["generated_token_ids"]
print(f"--- with 1.05 (the reference)\n{wrap(first['text'])}\n")
print(f"--- with 1.0\n{wrap(tok.decode(off_ids[prompt:], skip_special_tokens=True))}")
parted = next(i for i, (a, b) in enumerate(zip(off_ids, first["output_ids"])) if a != b)
print(f"\nthey part at new token {parted - prompt}")
if DTYPE == torch.float32:
    assert parted - prompt == changes[0]["first step"]

# %% [markdown]
# The run without the penalty takes the other branch at exactly the step the forward pass predicted, and the
# rest of its text goes its own way. Neither run is wrong; they are different decoding
# rules, and a reference has to say which one it used. These files say it in their `do_sample` and
# `repetition_penalty` fields, and {doc}`03_sampling` takes the penalty and the other filters apart.
#
# ## Summary
#
# - `pipeline("text-generation")` is five stages: chat template, tokenize, generate, decode, post-process.
# - `generate()` takes each setting from the call, else from `generation_config.json`, else from transformers'
#   defaults; minqwen's `SamplingConfig.resolve` is the same rule.
# - The Instruct model's file turns sampling on, so a call with no settings samples; `do_sample=False` gives
#   greedy decoding but keeps the checkpoint's repetition penalty of 1.05.
# - The golden references are greedy with that penalty, 48 new tokens at most, and every run re-checks them
#   field for field.
# - Turning the penalty off changes the greedy path only where it flips a winner; the forward pass shows where.
#
# ## Exercises
#
# ````{exercise}
# :label: pipeline-penalty-rate
# On the three references, at how many steps in all does the 1.05 penalty change the greedy token? Use the
# argmaxes computed above (`steps`).
# ````
#
# ```{solution-start} pipeline-penalty-rate
# :class: dropdown
# ```

# %%
flipped = {name: int((plain != pen).sum()) for name, (plain, pen) in steps.items()}
total = sum(len(plain) for plain, _ in steps.values())
print(flipped, f"{sum(flipped.values())} of {total} steps")

# %% [markdown]
# The penalty is small: it flips a winner only where the leader has already appeared and another token's logit
# is within a factor of 1.05 of the leader's. Each flip changes everything after it, though, so one flip is
# enough to give a different text.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: pipeline-resolve
# Predict what `generate()` does with each call below, then check with `SamplingConfig.resolve`: (a) only
# `temperature=0.2`; (b) `do_sample=True, top_k=0`; (c) no settings, for a checkpoint whose folder has no
# `generation_config.json`.
# ````
#
# ```{solution-start} pipeline-resolve
# :class: dropdown
# ```

# %%
calls = {
    "(a) temperature=0.2": SamplingConfig.resolve(
        config.sampling_defaults, temperature=0.2
    ),
    "(b) do_sample=True, top_k=0": SamplingConfig.resolve(
        config.sampling_defaults, do_sample=True, top_k=0
    ),
    "(c) no generation_config.json": SamplingConfig.resolve({}),
}
pd.DataFrame({name: dataclasses.asdict(c) for name, c in calls.items()}).T

# %% [markdown]
# (a) still samples, with top-k 20, top-p 0.8 and the penalty from the file, only sharper. (b) samples with
# top-k off but top-p 0.8 still on. (c) is greedy without a penalty, but a sampling call to such a model would
# get transformers' `top_k=50`: leaving a setting out is never the same as turning it off.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: pipeline-template-cost
# How many of each reference's prompt tokens are the chat template's, not the user's? Tokenize the bare message
# and compare.
# ````
#
# ```{solution-start} pipeline-template-cost
# :class: dropdown
# ```

# %%
overhead = {}
for r in fresh:
    bare = len(tok(r["messages"][0]["content"]).input_ids)
    overhead[r["name"]] = len(r["prompt_ids"]) - bare
    print(
        f"{r['name']}: {len(r['prompt_ids'])} prompt tokens, {bare} of them the message's"
    )
assert len(set(overhead.values())) == 1
print(f"the template adds {overhead['english']} tokens to every prompt")

# %% [markdown]
# The default system message and the ChatML markers cost the same number of tokens on every prompt, more than
# each of these short questions takes itself.
#
# ```{solution-end}
# ```
