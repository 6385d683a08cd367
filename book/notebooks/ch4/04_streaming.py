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
# # Streaming, and a command line
#
# A chat interface prints the answer as it is generated, and `minqwen.generate_tokens` already yields one token
# per step. Turning those tokens into text one at a time raises two problems. A token is not a character:
# byte-level {term}`BPE` can split one Chinese character or emoji across two or three tokens, and each part alone
# decodes to the replacement character `�` (U+FFFD). And a stop string such as `"\n\n"` or `"Observation:"` can be
# split across tokens too, so it can only be recognised once its last token arrives, after its first part would
# already have been printed. How does a stream print text that is always right, and stop exactly where it should?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how a multi-byte character falls across tokens, and how an incremental detokenizer holds its bytes back until
#   the character is complete;
# - how stop strings that straddle tokens are caught without printing any part of them;
# - `minqwen.stream`, which turns generation into text pieces and records why it finished;
# - the command line `python -m minqwen generate | chat`, built on all of it.
#
# **You need** the byte-level BPE tokenizer of {doc}`../ch3/01_tokenizer`, the chat template and
# {term}`EOS` tokens of {doc}`../ch1/02_explicit_loop`, and the cached loop of {doc}`02_manual_cache`. Running it
# takes the embedded model (about a minute on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import streaming as figures
from helpers import (
    DEVICE,
    DTYPE,
    MODEL_SOURCE,
    is_book_model,
    model_path,
    show_source,
)

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import minqwen
from minqwen.engine.streaming import (
    REPLACEMENT,
    Detokenizer,
    StopMatcher,
    Stream,
    stream,
)
from minqwen.tokenizer import BPETokenizer, render_chat

bpe = BPETokenizer.from_file(model_path())
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)

# %% [markdown]
# ## Characters split across tokens
#
# Every character is one to four bytes of UTF-8, and byte-level BPE cuts text into tokens by bytes, not by
# characters. Common characters, and common runs of them, have tokens of their own; a rare character such as 龘
# (U+9F98, "dragons flying") or an emoji outside the vocabulary is spelled with tokens that each hold part of
# its bytes. Here is how minqwen's tokenizer (`BPETokenizer`, chapter 3) cuts 龘 followed by a parrot emoji, what
# decoding the tokens received so far gives after each token, and what a stream should print:

# %% tags=["hide-input"]
figures.byte_split(bpe, "龘🦜")

# %% [markdown]
# (The figure's font has no CJK or emoji glyphs, so completed characters are written as their code points.) A
# decode of the tokens so far ends in `�` whenever the last token stops inside a character, and the `�` turns
# into the right character one token later. A stream that printed each decode's new text at once would print
# `�` and could never take it back. The same on a longer line, each token decoded alone and streamed:

# %%
text = "龘龘，你好🦜！🧑‍💻"
ids = bpe.encode(text)
detokenizer = Detokenizer(bpe)
rows = [
    {"token id": i, "decoded alone": bpe.decode([i]), "streamed": detokenizer.push(i)}
    for i in ids
]
streamed = "".join(r["streamed"] for r in rows) + detokenizer.flush()
alone = sum(REPLACEMENT in r["decoded alone"] for r in rows)
print(f"{len(ids)} tokens for {len(text)} characters; {alone} decode alone to U+FFFD")
print(f"streamed: {streamed!r}")
assert streamed == text and not any(REPLACEMENT in r["streamed"] for r in rows)
assert alone >= 4

# %% tags=["remove-input", "hide-output"]
pd.DataFrame(rows)

# %% [markdown]
# `Detokenizer` holds back any text that ends in `�` until the bytes that complete it arrive. It decodes a short
# window of ids, not each id alone, so tokenizers whose decoding depends on the previous token also come out right.
# If the bytes never complete, as when generation ends in the middle of a character, `flush()` releases them as
# `�`: the output never hides that something went wrong.

# %%
show_source(Detokenizer)

# %% [markdown]
# The hardest case feeds one token per UTF-8 byte (every byte has a token of its own, chapter 3's byte alphabet),
# so every multi-byte character is split. A character comes out at its last byte, never sooner:

# %%
byte_ids = [bpe.vocab[bpe.byte_to_char[b]] for b in "中文🙂".encode()]
detokenizer = Detokenizer(bpe)
pieces = [detokenizer.push(i) for i in byte_ids]
print(pieces)
assert pieces == ["", "", "中", "", "", "文", "", "", "", "🙂"]

# %% [markdown]
# ## Stop strings split across tokens
#
# `StopMatcher` receives the text pieces. It emits what can no longer be part of a stop string and holds back any
# tail that could still grow into one. When a stop string completes, it emits the text before it and stops. The
# stop string itself is never emitted (OpenAI's convention), nor is anything after it.

# %%
show_source(StopMatcher)

# %%
matcher = StopMatcher(["<|stop|>", "\n\n"])
chunks = ["The answer is 42.", "<|st", "op|", ">ignored"]
print([(chunk, matcher.feed(chunk)) for chunk in chunks], matcher.stopped)
assert matcher.stopped

# %% [markdown]
# The first chunk is safe and comes out whole; `<|st` and `op|` could be the start of `<|stop|>`, so they are held;
# `>` completes it, and nothing of the stop string or after it is emitted.
#
# ## `stream()`: generation as text
#
# `stream(model, tokenizer, prompt_or_ids, max_new_tokens, stop=..., **sampling)` runs `generate_tokens` (or a
# fast engine's own) and passes each token through both. It takes minqwen's `BPETokenizer` or a transformers
# tokenizer. It stops at an end token, which it does not print, or at a stop string. Once iteration ends, it
# records why in `finish_reason`, and `token_times` holds each token's arrival time. Leaving the loop early closes
# the generator, so no token is computed that nobody reads.

# %%
show_source(Stream)

# %% [markdown]
# The prompt goes through the chat template (`render_chat`, chapter 1) and minqwen's tokenizer. The answer is
# {term}`greedy <greedy decoding>` (`do_sample=False`), so it is the same on every run:


# %%
def chat_ids(question):
    messages = [{"role": "user", "content": question}]
    return bpe.encode(render_chat(messages, add_generation_prompt=True))


question = "用一句话介绍熊猫，并在结尾加一个表情符号。"
answer = stream(ours, bpe, chat_ids(question), 40, do_sample=False)
pieces = list(answer)
print(pieces)
print(answer.text)
print("finish:", answer.finish_reason, "| tokens:", len(answer.token_ids))

# %%
# the pieces add up to the full decode: any U+FFFD shown is one the model's bytes
# really make (random weights do)
assert (
    "".join(pieces)
    == answer.text
    == bpe.decode(answer.token_ids, skip_special_tokens=True)
)
if is_book_model():
    assert REPLACEMENT not in answer.text
assert answer.finish_reason in ("eos", "length")

# %% [markdown]
# The same question with the full stop `。` as a stop string. The answer ends just before the stop string, and
# generation ends with the token that completed it:

# %%
short = stream(ours, bpe, chat_ids(question), 40, stop="。", do_sample=False)
print(repr("".join(short)), short.finish_reason)
if "。" in answer.text:
    assert short.finish_reason == "stop"
    assert short.text == answer.text[: answer.text.index("。")]

# %% [markdown]
# And an answer short enough to end on its own. The model emits `<|im_end|>`, and the stream stops there without
# printing it:

# %%
brief = stream(
    ours, bpe, chat_ids("Reply with just the word: yes"), 20, do_sample=False
)
print(
    repr("".join(brief)),
    brief.finish_reason,
    brief.token_ids[-1],
    bpe.tokens([brief.token_ids[-1]])[0],
)
if is_book_model():
    assert brief.finish_reason == "eos"
    assert brief.token_ids[-1] in ours.config.eos_token_ids

# %% [markdown]
# ## The command line
#
# `python -m minqwen` wraps all of this. It reads the checkpoint's `tokenizer.json` with minqwen's own
# `BPETokenizer` and renders chats with `render_chat`, so it needs no transformers at all:
#
# - `generate "prompt"` answers one prompt through the chat template (`--raw` skips the template);
# - `chat` holds a multi-turn conversation on stdin, one message a line, interactively or from a pipe. A line
#   `/save FILE` writes the conversation so far as JSON, `--load FILE` continues it in a later session, `/reset`
#   starts over and `/exit` quits.
#
# Both stream their output and take `--model` (any `fetch` source, `embedded` by default), `--device`, `--dtype`,
# `--max-new-tokens`, `--system` and `--stop`. On a GPU they run the fast engine of {doc}`05_performance`
# (`--engine fast`, the default on CUDA; `--engine eager` is the loop of this chapter), and `--stats` prints each
# reply's prefill and decode {term}`tok/s` on stderr. Sampling defaults to the checkpoint's
# `generation_config.json`, which for Instruct models means temperature 0.7, top-k 20, top-p 0.8 and a repetition
# penalty of 1.05; `--greedy` turns sampling off, and `--temperature`, `--top-k`, `--top-p`,
# `--repetition-penalty` and `--seed` override it. `fetch` and `info` (the hardware report and the size advice of
# chapter 0) remain available.
#
# In a terminal, the three runs below are:
#
# ```bash
# python -m minqwen generate "把“我喜欢编程”翻译成英文，再用中文解释一下。" --greedy --max-new-tokens 24
# printf '我叫小明。\n我叫什么名字？\n/save chat.json\n' | python -m minqwen chat --greedy --stop $'\n'
# echo '请再说一遍我的名字。' | python -m minqwen chat --load chat.json --stats --greedy --stop $'\n'
# ```
#
# Here they run in a separate process each, in a scratch folder, with this page's model, device and dtype:

# %% tags=["hide-input"]
workdir = Path(tempfile.mkdtemp())


def minqwen_cli(*args, stdin=None):
    """`python -m minqwen ARGS` in the scratch folder, with this notebook's minqwen."""
    command = [sys.executable, "-m", "minqwen", *args]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    root = str(Path(minqwen.__file__).parents[1])  # the minqwen this notebook imports
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=workdir,
        timeout=600,
    )


common = [
    "--model",
    MODEL_SOURCE,
    "--device",
    DEVICE,
    "--dtype",
    str(DTYPE).removeprefix("torch."),
]
common += ["--greedy", "--max-new-tokens"]

# %%
prompt = "把“我喜欢编程”翻译成英文，再用中文解释一下。"
result = minqwen_cli("generate", prompt, *common, "24")
print(result.stdout)
assert result.returncode == 0 and result.stderr == "", result.stderr
if is_book_model():
    assert REPLACEMENT not in result.stdout
    assert any("\u4e00" <= ch <= "\u9fff" for ch in result.stdout)

# %% [markdown]
# A chat from a pipe. Each line is a turn, and the second question relies on the first answer; the last line saves
# the conversation (the notice goes to stderr):

# %%
stdin = "我叫小明。\n我叫什么名字？\n/save chat.json\n"
result = minqwen_cli("chat", "--stop", "\n", *common, "16", stdin=stdin)
print(result.stdout)
print(result.stderr)
assert result.returncode == 0 and result.stderr == "saved 4 messages to chat.json\n"
if is_book_model():
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "小明" in lines[1]

# %% [markdown]
# The saved file is the conversation as chat messages, which a later session continues with `--load`:

# %% tags=["hide-input"]
saved = json.loads((workdir / "chat.json").read_text(encoding="utf-8"))
print(json.dumps(saved, ensure_ascii=False, indent=1))
assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2

# %%
stdin = "请再说一遍我的名字。\n"
loaded = minqwen_cli(
    "chat", "--load", "chat.json", "--stats", "--stop", "\n", *common, "16", stdin=stdin
)
print(loaded.stdout)
assert loaded.returncode == 0
if is_book_model():
    assert "小明" in loaded.stdout

# %% [markdown]
# With `--stats`, each reply is followed on stderr by its speed, measured from the stream's `token_times`. It
# changes from run to run, so this output is not compared:

# %% tags=["nbval-ignore-output"]
print(loaded.stderr.strip())
assert loaded.stderr.startswith("[") and "decode" in loaded.stderr

# %% [markdown]
# Bad input is one line on stderr and exit code 2, caught before the model loads:

# %%
result = minqwen_cli("generate", "你好", "--top-p", "2")
print(f"exit {result.returncode}: {result.stderr.strip()}")
assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1

# %% [markdown]
# ## Summary
#
# - Byte-level BPE cuts by bytes, so a character of two to four UTF-8 bytes can fall across tokens; decoding the
#   tokens received so far ends in U+FFFD until the character's last byte arrives.
# - `Detokenizer` holds back text that ends in U+FFFD, so a stream never prints a broken character, and
#   `flush()` shows one honestly if generation stops inside it.
# - `StopMatcher` holds back any tail that could still become a stop string; the stop string and everything after
#   it are never printed.
# - `minqwen.stream` joins generation, the detokenizer and the stop matcher, works with minqwen's `BPETokenizer`,
#   and records `finish_reason` and each token's arrival time.
# - `python -m minqwen generate | chat` streams answers with minqwen's own tokenizer; `chat` keeps the
#   conversation, `/save` and `--load` carry it across sessions, `--stats` reports tok/s.
#
# ## Exercises
#
# ````{exercise}
# :label: streaming-stop-three-tokens
# An agent loop stops the model at `"Observation:"`, which minqwen's tokenizer spells with three tokens. Feed the
# tokens of `"Thought: I should look it up.\nObservation: 42"` one at a time through a `Detokenizer` and a
# `StopMatcher`, and show what each token lets out. Check that the stop string spans three tokens and that no part
# of it is ever emitted.
# ````
#
# ```{solution-start} streaming-stop-three-tokens
# :class: dropdown
# ```

# %%
stop = "Observation:"
ids = bpe.encode("Thought: I should look it up.\nObservation: 42")
detokenizer, matcher, steps = Detokenizer(bpe), StopMatcher([stop]), []
for i in ids:
    piece = detokenizer.push(i)
    steps.append({"token": bpe.decode([i]), "emitted": matcher.feed(piece)})
    if matcher.stopped:
        break
print(pd.DataFrame(steps).to_string())
emitted = "".join(step["emitted"] for step in steps)
assert len(bpe.encode(stop)) == 3 and matcher.stopped
assert emitted == "Thought: I should look it up.\n"
assert not any(step["emitted"] and step["emitted"] in stop for step in steps[-3:])

# %% [markdown]
# `Observ` and `ation` are held back (each could still be the start of the stop string); `:` completes it, and the
# matcher emits nothing more. The newline before it came out with the text before, since `\n` cannot start
# `Observation:`.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: streaming-cut-character
# What does a stream show when `max_new_tokens` ends generation between the two tokens of 龘? `Stream` takes any
# generator of token tensors: feed it the first token of 龘 after the tokens of `"A "`, and read its pieces,
# `text` and `finish_reason`.
# ````
#
# ```{solution-start} streaming-cut-character
# :class: dropdown
# ```

# %%
cut = bpe.encode("A ") + bpe.encode("龘")[:1]
tokens = (torch.tensor([i]) for i in cut)  # a generator, as generation gives
truncated = Stream(tokens, Detokenizer(bpe), eos_ids=set(), stop=[])
print(list(truncated), repr(truncated.text), truncated.finish_reason)
assert truncated.text == "A " + REPLACEMENT and truncated.finish_reason == "length"

# %% [markdown]
# The complete text comes out as it arrives; the partial character stays held until the tokens run out, and
# `flush()` then releases it as U+FFFD, so the reader sees that a character was cut rather than nothing at all.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: streaming-token-times
# `--stats` computes its numbers from `Stream.token_times`. Compute the same from the `answer` stream above:
# the time to the first token (the prefill) and the decode rate of the tokens after it, on a fresh greedy stream
# of 16 tokens. Why must the decode rate leave out the first token?
# ````
#
# ```{solution-start} streaming-token-times
# :class: dropdown
# ```

# %% tags=["nbval-ignore-output"]
timed = stream(ours, bpe, chat_ids(question), 16, do_sample=False)
started = time.perf_counter()
text = "".join(timed)
first, last = timed.token_times[0], timed.token_times[-1]
decode_rate = (len(timed.token_times) - 1) / (last - first)
print(f"first token after {first - started:.2f} s; then {decode_rate:.1f} tok/s")
assert first > started and decode_rate > 0

# %% [markdown]
# The first token costs a whole {term}`prefill` of the prompt, which has nothing to do with the decode rate, so
# the rate is taken between the first token and the last. Note that the clock starts when iteration starts:
# `stream()` is lazy, and no forward pass runs before the first piece is asked for.
#
# ```{solution-end}
# ```
