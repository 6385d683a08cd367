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
# # The whole engine
#
# Every part of Qwen2.5 inference now exists once, in `minqwen/`, and each chapter has checked its part against
# transformers. This page puts the parts back together. Can the engine answer a question with nothing of
# transformers in the loop, and does it still give transformers' tokens when it does?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how the parts built in chapters 1 to 4 fit into one path from a chat message to streamed text;
# - how little code that path is, part by part;
# - where to read next: the fast kernels, quantization, speculative decoding and several GPUs.
#
# **You need** the book so far; every box in the figure below names its page. Running it takes the embedded
# model, about a minute on a laptop CPU.
# ```

# %% tags=["hide-input"]
from figures import engine as figures
from helpers import DEVICE, DTYPE, MODEL_SOURCE, agree_up_to_a_near_tie, hf_model

import importlib
import inspect

import pandas as pd
import torch

import minqwen

# %% [markdown]
# ## The parts
#
# One new token takes this path. The chat template and the tokenizer turn messages into ids once; the model turns
# ids into {term}`logits`, reading and writing the {term}`KV cache`; the sampler picks a token; the stream turns
# tokens back into text without splitting a character; and the new token goes round again. The fast engine runs
# the same loop with its shapes fixed, so that a GPU can replay each step as one {term}`CUDA graph`.

# %% tags=["hide-input"]
figures.whole_engine()

# %% [markdown]
# Each part is one module of the package, short enough to read in one sitting ({doc}`../../package` shows
# the source of every one):

# %% tags=["hide-input", "nbval-ignore-output"]
parts = {
    "tokenizer and chat template": "tokenizer",
    "configuration and its checks": "model.config",
    "rotary embeddings": "model.rope",
    "attention, MLP, RMSNorm": "model.layers",
    "the model and its loader": "model.qwen2",
    "KV caches": "model.cache",
    "sampling filters and draws": "engine.sampling",
    "the request: defaults and input checks": "engine.request",
    "the generate loop": "engine.generate",
    "streaming text": "engine.streaming",
    "the fast engine": "engine.fast",
    "split attention (a Triton kernel)": "engine.decode_attention",
    "speculative decoding": "engine.speculative",
    "tensor parallelism: the split": "parallel.sharding",
}
parts = {
    what: importlib.import_module(f"minqwen.{name}") for what, name in parts.items()
}
pd.DataFrame(
    {
        "module": [m.__name__ for m in parts.values()],
        "lines": [len(inspect.getsource(m).splitlines()) for m in parts.values()],
    },
    index=list(parts),
)

# %% [markdown]
# ## A reply, with minqwen alone
#
# Fetching the checkpoint, reading its tokenizer, loading the weights, writing the chat prompt, generating and
# streaming the first 32 tokens: six lines, all minqwen's. `do_sample=False` asks for {term}`greedy decoding`; every other setting,
# the {term}`repetition penalty` among them, comes from the checkpoint's `generation_config.json`, as in
# transformers.

# %%
folder = minqwen.fetch(MODEL_SOURCE)
bpe = minqwen.BPETokenizer.from_file(folder)
ours = minqwen.Qwen2.from_pretrained(folder, dtype=DTYPE, device=DEVICE)
messages = [
    {"role": "user", "content": "Write a Python function that reverses a list."}
]
ids = bpe.encode(minqwen.render_chat(messages, add_generation_prompt=True))
reply = minqwen.stream(ours, bpe, ids, 32, do_sample=False)
print("".join(reply))

# %% [markdown]
# transformers, given the same ids and the same single setting, decodes the same tokens (in bfloat16 they may
# part at a near-tie, which `agree_up_to_a_near_tie` allows):

# %%
hf = hf_model()
prompt = torch.tensor([ids], device=DEVICE)
with torch.inference_mode():
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=32,
    )[0, len(ids) :].tolist()
print(
    f"{len(reply.token_ids)} tokens, the same as transformers': {reply.token_ids == theirs}"
)
assert agree_up_to_a_near_tie(ours, prompt, reply.token_ids, theirs)

# %% [markdown]
# With no settings at all the Instruct checkpoint samples (temperature 0.7, top-k 20, top-p 0.8, penalty 1.05),
# and a seed makes the run repeatable. The fast engine takes the same call; on a CPU it draws with the same
# processors and the same random numbers, so its tokens are the eager loop's.

# %%
engine = minqwen.FastQwen2(ours)
eager = minqwen.stream(ours, bpe, ids, 24, seed=0)
faster = minqwen.stream(engine, bpe, ids, 24, seed=0)
print("".join(eager))
print("the fast engine, same seed, same tokens:", "".join(faster) == eager.text)
if DTYPE == torch.float32:
    assert faster.token_ids == eager.token_ids

# %% [markdown]
# ## Where to read next
#
# The engine is complete and exact, and on a GPU its fast path is already several times faster than
# transformers' compiled generate ({doc}`../ch4/05_performance`). What separates it from a serving engine is the
# subject of the next steps, and of the work this book learned from:
#
# - **Fewer, fuller kernels.** A decode step of a small model is mostly launch gaps between a few hundred small
#   kernels. gpt-fast (`pytorch-labs/gpt-fast`) compiles the step; Hazy Research's "No Bubbles" megakernel runs a
#   whole Llama-1B step as one persistent kernel at 78% of an H100's bandwidth. FlashAttention and
#   FlashDecoding split attention so that one long sequence fills the GPU.
# - **Fewer bytes per weight.** Decoding reads every weight once per token, so int8 and int4 weights
#   (torchao's weight-only quantization, llama.cpp's GGUF block formats, the format the book's model ships in)
#   speed it up by almost the ratio of bytes when the kernels keep up: chapter 6's int4 decodes 7.8 times as fast
#   as float32 on this CPU, but only 1.57 times bf16 at 7B on an H200, where the kernel at one row sets the pace.
# - **More tokens per weight read.** Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) lets a small
#   draft model propose several tokens that the large model checks in one pass, with the same output
#   distribution. Chapter 7 builds it: on an H200, prompt lookup decodes the 1.5B's edits 2.6 to 2.7 times as
#   fast ({doc}`../ch7/02_acceptance_and_speed`).
# - **Several GPUs.** Tensor parallelism (Megatron-LM) splits every matrix across GPUs, with two all-reduces per
#   layer; `torch.distributed` and `torchrun` provide the plumbing. Chapter 8 builds it: the 72B, too large for
#   one H200, decodes on two at 80% of their roofline, and the 7B 1.34 times faster than on one
#   ({doc}`../ch8/02_two_gpus`).
# - **Many users at once.** vLLM's PagedAttention and nano-vllm (`GeeeekExplorer/nano-vllm`) schedule requests
#   continuously over a KV cache kept in pages.
#
# ## Summary
#
# - One path turns messages into streamed text: chat template, tokenizer, embedding, decoder layers with their KV
#   cache, head, sampler, stream; each part is one module of a few hundred lines at most.
# - Called with transformers' arguments, minqwen gives transformers' tokens: greedy, and sampled for a seed.
# - The settings a caller leaves out come from the checkpoint, as in transformers, so the two agree by default.
# - The fast engine is the same loop with fixed shapes; on a CPU its tokens equal the eager loop's, on a GPU it
#   replays each step as a CUDA graph.
#
# ## Exercises
#
# ````{exercise}
# :label: engine-batch
# Serve two chat prompts at once: encode each with `bpe`, left-pad them into one batch with an attention
# mask, generate 12 greedy tokens with the fast engine, and check that each row equals its prompt run alone.
# ````
#
# ```{solution-start} engine-batch
# :class: dropdown
# ```

# %%
questions = ["What is 2 + 2?", "Say hello in French."]
prompts = [
    bpe.encode(
        minqwen.render_chat(
            [{"role": "user", "content": q}], add_generation_prompt=True
        )
    )
    for q in questions
]
width = max(map(len, prompts))
pad = ours.config.pad_token_id
batch = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=DEVICE)
mask = torch.tensor(
    [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE
)
together = engine.generate(batch, 12, attention_mask=mask, do_sample=False)
for row, p in enumerate(prompts):
    alone = engine.generate(torch.tensor([p], device=DEVICE), 12, do_sample=False)[
        0, len(p) :
    ]
    new = together[row, width:].tolist()
    ended = next(
        (i for i, t in enumerate(new) if t in ours.config.eos_token_ids), len(new) - 1
    )
    print(
        f"{questions[row]!r}: {bpe.decode(new[: ended + 1], skip_special_tokens=True)!r}"
    )
    assert agree_up_to_a_near_tie(
        ours,
        prompt[:, :0].new_tensor([p]),
        new[: ended + 1],
        alone[: ended + 1].tolist(),
    )

# %% [markdown]
# Left padding puts every prompt's last token in the last column, the mask keeps padding out of attention and
# positions, and finished rows are padded until the last row ends ({doc}`../ch4/03_batching`).
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: engine-stop
# Stream a longer answer and stop it at the first blank line, with a stop string. Which `finish_reason` does the
# stream report, and is the stop string part of the text?
# ````
#
# ```{solution-start} engine-stop
# :class: dropdown
# ```

# %%
request_ids = bpe.encode(
    minqwen.render_chat(
        [{"role": "user", "content": "Explain recursion, then give an example."}],
        add_generation_prompt=True,
    )
)
cut = minqwen.stream(ours, bpe, request_ids, 60, do_sample=False, stop="\n\n")
text = "".join(cut)
print(text)
print(f"finish_reason: {cut.finish_reason}")
assert "\n\n" not in text and cut.finish_reason in ("stop", "eos", "length")

# %% [markdown]
# The stream holds back any tail that could still become the stop string, cuts there, and reports `"stop"`;
# the stop string itself is never emitted ({doc}`../ch4/04_streaming`). A reply that ends first reports `"eos"`.
#
# ```{solution-end}
# ```
