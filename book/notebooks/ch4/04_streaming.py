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
# A chat interface prints the answer as it is generated. `minqwen.generate_tokens` already yields one token per
# step. Turning those tokens into text one at a time raises two problems. A token is not a character: byte-level
# BPE can split one Chinese character or emoji across two or three tokens, and each half alone decodes to the
# replacement character `�`. And a stop string such as `"\n\n"` or `"Observation:"` can be split across tokens
# too, so it can only be recognised once its last token arrives, after its first half would already have been
# printed.

# %%
from helpers import (
    DEVICE,
    DTYPE,
    MODEL_SOURCE,
    is_book_model,
    model_path,
    show_source,
    tokenizer,
)

import os
import subprocess
import sys

import pandas as pd
from transformers.convert_slow_tokenizer import bytes_to_unicode

import minqwen
from minqwen.engine.streaming import REPLACEMENT, Detokenizer, StopMatcher, stream

tok = tokenizer()

# %% [markdown]
# ## Characters split across tokens
#
# Here is how the Qwen tokenizer cuts a line of Chinese with emoji. Most characters are one token, or share one.
# Rare ones such as 龘 (dragons flying) and some emoji are split into byte tokens. Decoding each token alone shows the damage.

# %%
text = "龘龘，你好🦜！🧑‍💻"
ids = tok(text, add_special_tokens=False)["input_ids"]
detokenizer = Detokenizer(tok)
rows = [
    {"token id": i, "decoded alone": tok.decode([i]), "streamed": detokenizer.push(i)}
    for i in ids
]
pd.DataFrame(rows)

# %%
streamed = "".join(r["streamed"] for r in rows) + detokenizer.flush()
assert streamed == text and not any(REPLACEMENT in r["streamed"] for r in rows)
assert sum(REPLACEMENT in r["decoded alone"] for r in rows) >= 4

# %% [markdown]
# `Detokenizer` holds back any text that ends in `�` until the bytes that complete it arrive. It decodes a short
# window of ids, not each id alone, so tokenizers whose decoding depends on the previous token also come out right.
# If bytes never complete, as when generation ends in the middle of a character, `flush()` releases them as `�`.
# The output never hides that something went wrong.

# %%
show_source(Detokenizer)

# %% [markdown]
# The hardest case feeds one token per UTF-8 byte, so that every multi-byte character is split. A character comes out at
# its last byte, never sooner.

# %%
byte_token = bytes_to_unicode()
byte_ids = tok.convert_tokens_to_ids([byte_token[b] for b in "中文🙂".encode()])
detokenizer = Detokenizer(tok)
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
# ## `stream()`: generation as text
#
# `stream(model, tokenizer, prompt_or_ids, max_new_tokens, stop=..., **sampling)` runs `generate_tokens` and passes
# each token through both. It stops at an end token, which it does not print, or at a stop string. Once iteration
# ends, it records why in `finish_reason`. Leaving the loop early closes the generator, so no token is computed that
# nobody reads.

# %%
show_source(minqwen.engine.streaming.Stream)

# %%
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)


def chat_ids(question):
    return tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]


answer = stream(ours, tok, chat_ids("用一句话介绍熊猫，并在结尾加一个表情符号。"), 40)
pieces = list(answer)
print(pieces)
print(answer.text)
print("finish:", answer.finish_reason, "| tokens:", len(answer.token_ids))

# %%
# the pieces add up to the full decode: any U+FFFD shown is one the model's bytes really make (random weights do)
assert (
    "".join(pieces)
    == answer.text
    == tok.decode(answer.token_ids, skip_special_tokens=True)
)
if is_book_model():
    assert REPLACEMENT not in answer.text
assert answer.finish_reason in ("eos", "length")

# %% [markdown]
# The same question with the full stop `。` as a stop string. The answer ends just before the stop string, and
# generation ends with the token that completed it.

# %%
short = stream(
    ours, tok, chat_ids("用一句话介绍熊猫，并在结尾加一个表情符号。"), 40, stop="。"
)
print(repr("".join(short)), short.finish_reason)
if "。" in answer.text:
    assert (
        short.finish_reason == "stop"
        and short.text == answer.text[: answer.text.index("。")]
    )

# %% [markdown]
# And an answer short enough to end on its own. The model emits `<|im_end|>`, the stream stops there and does not
# print it.

# %%
brief = stream(ours, tok, chat_ids("Reply with just the word: yes"), 20)
print(
    repr("".join(brief)),
    brief.finish_reason,
    brief.token_ids[-1],
    tok.convert_ids_to_tokens(brief.token_ids[-1]),
)
if is_book_model():
    assert (
        brief.finish_reason == "eos"
        and brief.token_ids[-1] in ours.config.eos_token_ids
    )

# %% [markdown]
# ## The command line
#
# `python -m minqwen` wraps all of this:
#
# - `generate "prompt"` answers one prompt through the chat template (`--raw` skips the template);
# - `chat` holds a multi-turn conversation on stdin, one message a line. It works interactively and from a pipe.
#
# Both stream their output. They take `--model` (any `fetch` source, `embedded` by default), `--device`, `--dtype`,
# `--max-new-tokens`, `--system` and `--stop`. Sampling defaults to the checkpoint's `generation_config`, which for
# Instruct models means temperature 0.7, top-k 20, top-p 0.8 and a repetition penalty of 1.05. `--greedy` turns
# sampling off, and `--temperature`, `--top-k`, `--top-p`, `--repetition-penalty` and `--seed` override it.
# `fetch` and `info` (the hardware report and the size advice of chapter 0) remain available.
#
# Here it runs in a separate process, on Chinese.


# %%
def minqwen_cli(*args, stdin=None):
    command = [sys.executable, "-m", "minqwen", *args]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=600,
    )


common = [
    "--model",
    MODEL_SOURCE,
    "--device",
    DEVICE,
    "--dtype",
    str(DTYPE).removeprefix("torch."),
    "--greedy",
]
result = minqwen_cli(
    "generate",
    "把“我喜欢编程”翻译成英文，再用中文解释一下。",
    "--max-new-tokens",
    "24",
    *common,
)
print(result.stdout)
assert result.returncode == 0 and result.stderr == "", result.stderr
if is_book_model():
    assert REPLACEMENT not in result.stdout and any(
        "\u4e00" <= ch <= "\u9fff" for ch in result.stdout
    )

# %% [markdown]
# A chat from a pipe. Each line is a turn, and the second question relies on the first answer.

# %%
result = minqwen_cli(
    "chat",
    "--max-new-tokens",
    "16",
    "--stop",
    "\n",
    *common,
    stdin="我叫小明。\n我叫什么名字？\n",
)
print(result.stdout)
assert result.returncode == 0 and result.stderr == "", result.stderr
if is_book_model():
    assert (
        len(result.stdout.splitlines()) == 2 and "小明" in result.stdout.splitlines()[1]
    )

# %% [markdown]
# Bad input is one line on stderr and exit code 2, caught before the model loads.

# %%
result = minqwen_cli("generate", "你好", "--top-p", "2")
print(f"exit {result.returncode}: {result.stderr.strip()}")
assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
