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
# # The tokenizer, by hand
#
# The model never sees text. It sees integers, one per *token*, and everything it writes comes back as integers
# that something must turn into text again. How does Qwen2.5 turn any string, in any script, into ids and back,
# and can we rebuild that with no `tokenizers` or `transformers` code and get exactly HF's ids?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - byte-level {term}`BPE`: text becomes UTF-8 bytes, each byte a printable character, and a ranked list of
#   merges glues frequent neighbours into tokens, so no string can fail to encode;
# - the vocabulary and its added control tokens, and what the GGUF-rebuilt tokenizer file differs in;
# - how English, Chinese, code and emoji tokenize, byte by byte;
# - the {term}`chat template` written as a plain Python function.
#
# **You need** the embedded model's tokenizer files from {doc}`../ch0/01_weights`. `minqwen.tokenizer` is
# checked against HF's tokenizer on 5,000 varied strings; the page runs in about half a minute.
# ```

# %% tags=["hide-input"]
from corpus import sample_corpus
from figures import tokenizer as figures
from helpers import model_path, show_source, tokenizer

import inspect
import json
import time
import unicodedata

import pandas as pd
from IPython.display import display
from tokenizers import Regex, Tokenizer, pre_tokenizers

from minqwen.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    BPETokenizer,
    bytes_to_unicode,
    render_chat,
)

path = model_path()
hf = tokenizer()
spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
config = json.loads((path / "config.json").read_text())

# %% [markdown]
# minqwen's tokenizer reads the same `tokenizer.json` as HF's:

# %%
ours = BPETokenizer.from_file(path)
print(type(hf).__name__, "| ours:", type(ours).__name__)

# %% [markdown]
# ## The vocabulary
#
# `tokenizer.json` holds the BPE vocabulary (string → id), the ordered merge list, and the *added tokens*:
# control strings such as `<|im_start|>` that are matched in the text before BPE runs and never split.

# %% tags=["hide-input"]
vocab = spec["model"]["vocab"]
added = spec["added_tokens"]
padding_rows = [token for token in vocab if token.startswith("[PAD")]
regular = len(vocab) - len(added) - len(padding_rows)
pd.Series(
    {
        "entries in vocab": len(vocab),
        "byte-level BPE tokens": regular,
        "added (control) tokens": len(added),
        "[PAD] rows": len(padding_rows),
        "merges": len(spec["model"]["merges"]),
        "len(HF tokenizer)": len(hf),
        "len(ours)": len(ours),
        "config.json vocab_size": config["vocab_size"],
    },
    name="count",
).to_frame()

# %%
assert len(ours) == len(hf) == len(vocab) == config["vocab_size"] == 151936
assert (regular, len(added), len(padding_rows)) == (151643, 22, 271)
# 256 single-byte tokens, then one token per merge: the merges build the vocabulary.
assert regular == 256 + len(spec["model"]["merges"])

# %% [markdown]
# The 22 added tokens, with the ids the rest of the book relies on. `special` marks those that
# `decode(..., skip_special_tokens=True)` drops; the two tool-call tags are added but not special, so they
# survive that. The roles come from `tokenizer_config.json` and `generation_config.json`: `<|im_end|>` ends a
# chat turn, `<|endoftext|>` ends a document and pads batches, and generation stops at either.

# %% tags=["hide-input"]
generation_config = path / "generation_config.json"
stop_ids = (
    json.loads(generation_config.read_text()).get("eos_token_id", [])
    if generation_config.is_file()
    else []
)
roles = {}
for role, token in {
    "bos": hf.bos_token,
    "eos": hf.eos_token,
    "pad": hf.pad_token,
}.items():
    roles.setdefault(token, []).append(role)
for i in stop_ids if isinstance(stop_ids, list) else [stop_ids]:
    roles.setdefault(hf.convert_ids_to_tokens(i), []).append("stops generation")
specials = pd.DataFrame(
    [
        {
            "id": t["id"],
            "token": t["content"],
            "special": t["special"],
            "role": ", ".join(roles.get(t["content"], [])),
        }
        for t in added
    ]
).set_index("id")
expected_ids = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<tool_call>": 151657,
    "<|fim_prefix|>": 151659,
    "<|file_sep|>": 151664,
}
assert all(
    hf.convert_tokens_to_ids(token) == i == ours.added_tokens[token].id
    for token, i in expected_ids.items()
)
assert (hf.eos_token_id, hf.pad_token_id) == (151645, 151643)
assert {i: t.content for i, t in hf.added_tokens_decoder.items()} == {
    t["id"]: t["content"] for t in added
}
specials

# %% [markdown]
# Nothing is added around the text: Qwen's post-processor puts no BOS token in front.

# %%
print(hf.encode("hi"), ours.encode("hi"))
assert hf.encode("hi") == ours.encode("hi") == [6023]

# %% [markdown]
# ## What the GGUF-rebuilt file differs in
#
# Our tokenizer files were rebuilt by transformers from the {term}`GGUF` that ships the weights, not downloaded
# from the hub. Two things follow, and it is worth being exact about what each one changes.
#
# **271 padding entries.** Qwen2.5's tokenizer has 151,643 BPE tokens and 22 added tokens, 151,665 in all, while
# the embedding matrix has 151,936 rows, padded to a multiple of 128 (1187 × 128). A GGUF stores one token string
# per row, so the rows past 151,664 carry the names `[PAD151665]` to `[PAD151935]`, and the rebuilt vocabulary
# keeps them. They change no encoding: no merge produces them, and typing their name gives ordinary pieces. They
# change only `len(tokenizer)` (151,936 rather than 151,665) and what decoding such an id prints: its name, where
# a tokenizer without these entries has no text for it. The model never saw these ids in training, so it should
# not produce them; if it did, the name would leak into the text.

# %% tags=["hide-input"]
typed = hf.encode("[PAD151665]")
print("encode('[PAD151665]') ->", typed)
print("  pieces:", hf.convert_ids_to_tokens(typed))
print("decode([151665, 151935]) ->", repr(hf.decode([151665, 151935])))
assert ours.encode("[PAD151665]") == typed and 151665 not in typed
assert (
    ours.decode([151665, 151935])
    == hf.decode([151665, 151935])
    == "[PAD151665][PAD151935]"
)

# %% [markdown]
# **No normalizer in the file.** The hub's Qwen2 `tokenizer.json` normalizes text to Unicode NFC before
# anything else; the rebuilt file says `"normalizer": null`. Whether that matters depends on who reads the file.
# transformers 5's `Qwen2Tokenizer` does not take the pipeline from the file: it rebuilds it from the vocabulary
# and merges, and sets NFC itself:

# %% tags=["hide-input"]
init_source = inspect.getsource(type(hf).__init__)
sets_normalizer = [
    line.strip() for line in init_source.splitlines() if "normalizer" in line
]
print("file:", spec["normalizer"], "| transformers sets:", sets_normalizer)
print("HF tokenizer in use:", hf.backend_tokenizer.normalizer)

# %% [markdown]
# So `AutoTokenizer` applies NFC on this file exactly as on the hub's. Something that reads the file as it is,
# such as the `tokenizers` library on its own, does not. The two differ only on text that is not already NFC,
# where an accented letter is written as a base letter plus a combining mark. macOS file names, some PDFs and
# decomposed Hangul look like that. NFC folds such text into the precomposed characters the model was trained on;
# without it, the same word arrives as rarer byte sequences. `BPETokenizer` takes `normalization="NFC"` (the
# default, like `AutoTokenizer`) or `None` (like the file read raw), and matches each:

# %% tags=["hide-input"]
raw_file = Tokenizer.from_file(str(path / "tokenizer.json"))
ours_raw = BPETokenizer.from_file(path, normalization=None)
rows = []
spellings = {
    "café (NFC)": "café",
    "café (NFD)": "cafe\u0301",
    "한국 (NFD)": unicodedata.normalize("NFD", "한국"),
}
for label, text in spellings.items():
    with_nfc, without = ours.encode(text), ours_raw.encode(text)
    assert with_nfc == hf.encode(text)
    assert without == raw_file.encode(text).ids
    rows.append(
        {
            "text": label,
            "code points": len(text),
            "NFC (HF, ours)": with_nfc,
            "none (tokenizers, ours)": without,
        }
    )
pd.DataFrame(rows).set_index("text")

# %% [markdown]
# With NFC, both spellings of *café* give the same ids, in HF's tokenizer and ours alike; without it (the
# `tokenizers` library reading the file as is, and ours with `None`), the decomposed one costs an extra token, and the decomposed Hangul falls apart into
# jamo bytes. The price of NFC is that decoding returns the composed text, not the bytes that went in: the round
# trip is exact for NFC text only. We check both facts on the corpus below.
#
# ## Step 1: bytes as printable characters
#
# BPE works on strings, and every vocabulary entry must be a printable string. GPT-2's trick: give each of the
# 256 byte values a character. The printable Latin-1 bytes stand for themselves, and the other 68 (the controls,
# the space, the no-break space and the soft hyphen) are moved past U+0100, in byte order:

# %%
show_source(bytes_to_unicode)

# %% tags=["hide-input"]
byte_table = bytes_to_unicode()
figures.byte_grid(byte_table)

# %% [markdown]
# Read the grid by row and column: byte `0x20`, the space, is row `2_` column `_0` and is spelled `Ġ`; a newline,
# `0x0A`, is `Ċ`; `0x41` is `A` itself. That is why Qwen's vocabulary is full of `Ġ`: a token that starts with a
# space. Every one of these 256 characters is a token, so nothing can fail to encode:

# %%
print(
    " ".join(
        f"0x{b:02X}→{byte_table[b]}" for b in (0x20, 0x0A, 0x09, 0x00, 0x41, 0xA0, 0xE4)
    )
)
assert sorted(byte_table) == list(range(256)) and len(set(byte_table.values())) == 256
assert all(char in vocab for char in byte_table.values())

# %% [markdown]
# ## Step 2: the pre-tokenizer
#
# Before BPE, a regex cuts the text into words, and merges never cross a word boundary. Qwen2's pattern, read
# from `tokenizer.json`:

# %%
pattern = ours.pattern.pattern
print(pattern)
assert pattern == spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]

# %% [markdown]
# | alternative | takes | example |
# |---|---|---|
# | `(?i:'s\|'t\|'re\|'ve\|'m\|'ll\|'d)` | English contractions, any case | `'ll`, `'S` |
# | `[^\r\n\p{L}\p{N}]?\p{L}+` | a run of letters, with at most one leading non-letter (often a space) | ` world`, `_name`, `你好` |
# | `\p{N}` | **one** digit: numbers are always split digit by digit | `2`, `０`, `½` |
# | ` ?[^\s\p{L}\p{N}]+[\r\n]*` | a punctuation run, with an optional leading space and trailing newlines | ` +=`, `):\n` |
# | `\s*[\r\n]+` | whitespace ending in newlines | `\n\n` |
# | `\s+(?!\S)` | whitespace not followed by text, so the last space joins the next word | the indent before `return` |
# | `\s+` | any remaining whitespace | |
#
# The `regex` package understands `\p{L}` and `\p{N}`, as `tokenizers`' Oniguruma does. Our split gives the
# same words as HF's pre-tokenizer; `pre_tokenize` then spells each word's bytes with the table above:

# %%
sample = "def f(x):\n    return x**2  # it's 2024年, 你好!"
ours_words = ours.pattern.findall(sample)
print(ours_words)
print(ours.pre_tokenize(sample))

# %% tags=["hide-input"]
hf_words = [
    word for word, _ in hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str(sample)
]
assert (
    ["".join(byte_table[b] for b in w.encode()) for w in ours_words]
    == hf_words
    == ours.pre_tokenize(sample)
)
print("the same words as HF's pre-tokenizer")

# %% [markdown]
# ## Step 3: merges
#
# `merges` is an ordered list of pairs; a pair's index is its **rank**, and a lower rank was learned earlier (it
# was more frequent in the training corpus). BPE on one word repeats a single step: among the adjacent pairs,
# take the one of lowest rank and merge it everywhere in the word; stop when no adjacent pair has a rank.

# %%
show_source(BPETokenizer.bpe)

# %% [markdown]
# Here it is at work on a code identifier, `_fibonacci`. The folded helper `bpe_steps` reruns `bpe`'s loop and
# keeps every intermediate state; its result must equal `bpe`'s:

# %%
word = ours.pre_tokenize("_fibonacci")[0]
steps = figures.bpe_steps(ours, word)
assert steps[-1]["symbols"] == ours.bpe(word)
print(f"{len(steps) - 1} merges: {ours.bpe(word)}")

# %% tags=["hide-input"]
figures.merge_steps(steps, ours.encode("_fibonacci"))

# %% [markdown]
# The cheapest pair goes first: `o + n`, rank 7, one of the first merges ever learned. Order matters: at the
# second step both `f + i` and `i + b` are available, `i + b` has the lower rank, so it takes the `i` and `fi`
# never forms; `f` joins `_` instead. `onacci` is built last, from pieces that each had a rank of their own. The
# word ends as three tokens because no merge joins `_f`, `ib` and `onacci`: BPE's corpus did not have
# `_fibonacci` often enough. With a leading space,
# the spelling that follows `def`, the word is a single token:

# %%
print(ours.bpe(ours.pre_tokenize(" fibonacci")[0]), ours.encode(" fibonacci"))
assert (
    ours.encode(" fibonacci") == hf.encode(" fibonacci")
    and len(ours.encode(" fibonacci")) == 1
)

# %% [markdown]
# ## The whole encoder
#
# `encode` first cuts out the added tokens, longest first, so `<|im_start|>` in the text is one id and the text
# between added tokens goes through NFC, the regex and BPE. The BPE result of each word is cached: a code file
# repeats `self`, `return` and four-space indents hundreds of times, and the cache makes all but the first cost
# one dictionary lookup.

# %%
show_source(BPETokenizer.encode)
show_source(BPETokenizer._encode_ordinary)

# %% [markdown]
# ## Tokenization, byte by byte
#
# Six kinds of text, each encoded by both tokenizers, which must agree, and decoded back to the same text:

# %% tags=["hide-input"]
samples = {
    "English": "The quick brown fox can't stop.",
    "Chinese": "通义千问是阿里云研发的大语言模型。",
    "mixed": "Qwen2.5模型有0.5B参数",
    "special characters": "naïve → ∑ ½ \t\u00a0«quote»",
    "code": "for i in range(10):\n    print(i ** 2)",
    "emoji": "👍🏽 🇨🇳 👨‍👩‍👧",
}
summary = []
for kind, text in samples.items():
    ids = ours.encode(text)
    assert ids == hf.encode(text), kind
    assert ours.decode(ids) == hf.decode(ids) == text, kind
    summary.append(
        {
            "kind": kind,
            "characters": len(text),
            "UTF-8 bytes": len(text.encode()),
            "tokens": len(ids),
            "bytes per token": round(len(text.encode()) / len(ids), 2),
        }
    )
pd.DataFrame(summary).set_index("kind")

# %% [markdown]
# English words are mostly one token each, with the space in front. A common Chinese character is one token of 3
# bytes, and frequent pairs such as 模型 (model) are one token. Digits always go one by one. Code keeps indents
# as whitespace tokens. The Chinese sentence as its tokens: the id, the piece in the byte-level alphabet, its
# UTF-8 bytes, and the text the piece decodes to alone (the folded `token_table` builds it):

# %% tags=["hide-input"]
figures.token_table(ours, samples["Chinese"])

# %% [markdown]
# The other samples' tables are folded here:

# %% tags=["remove-input", "hide-output"]
for kind in ("English", "mixed", "special characters", "code"):
    print(kind)
    display(figures.token_table(ours, samples[kind]))

# %% [markdown]
# An emoji may be several code points: a skin tone modifier, two regional indicators for a flag, zero-width
# joiners (`e2 80 8d`) that glue three people into a family. Frequent emoji such as 👍 or 👩 have a 4-byte token
# of their own. The rest, the joiner included, is cut between bytes, into pieces that decode alone to U+FFFD (�)
# and only make sense together.

# %% tags=["hide-input"]
figures.token_table(ours, samples["emoji"])

# %% [markdown]
# ## The check: 5,000 strings
#
# A handful of samples proves little. `sample_corpus` draws strings from a seeded generator, cycling through
# eight kinds: windows of Python source from pinned packages in the environment, Chinese sentences and random
# runs of Chinese characters, English with contractions, emoji sequences, random code points from many scripts,
# whitespace runs (tabs, `\r\n`, U+3000, NBSP, U+2028 and others), numbers in many notations (including
# full-width and Arabic-Indic digits), and mixtures of all of these with added tokens and NFD text among them.
# Both tokenizers encode every string, ours twice (with its word cache empty, then warm):

# %% tags=["hide-input", "nbval-ignore-output"]
corpus = sample_corpus(5000, seed=0)
ours_fresh = BPETokenizer.from_file(path)
start = time.perf_counter()
ours_ids = [ours_fresh.encode(text) for _, text in corpus]
cold = time.perf_counter() - start
start = time.perf_counter()
ours_ids_again = [ours_fresh.encode(text) for _, text in corpus]
warm = time.perf_counter() - start
start = time.perf_counter()
hf_ids = [hf.encode(text) for _, text in corpus]
hf_time = time.perf_counter() - start
print(
    f"ours: {cold:.2f} s with an empty word cache, {warm:.2f} s with it warm "
    f"({len(ours_fresh._word_cache):,} words); HF (Rust): {hf_time:.2f} s"
)
assert ours_ids == ours_ids_again and cold < 60

# %%
mismatched = [text for (_, text), a, b in zip(corpus, ours_ids, hf_ids) if a != b]
tokens = sum(map(len, hf_ids))
print(f"{len(corpus):,} strings, {tokens:,} tokens, {len(mismatched)} mismatches")
assert mismatched == []

# %% tags=["remove-input"]
kinds = pd.DataFrame(corpus, columns=["kind", "text"]).assign(
    tokens=[len(ids) for ids in hf_ids]
)
examples = kinds.groupby("kind", sort=False).agg(
    strings=("text", "size"),
    tokens=("tokens", "sum"),
    example=("text", lambda texts: repr(max(texts.iloc[:6], key=len)[:48])),
)
examples

# %% [markdown]
# Every id agrees. The tests (`tests/test_ch3_tokenizer.py`) run the same check on another seed, plus edge cases:
# the empty string, all 256 bytes, 1,000 spaces, look-alike special tokens such as `<|IM_START|>` and `<|im_start|`,
# lone combining marks and characters outside the BMP.
#
# ## Decoding
#
# Decoding maps each piece's characters back to bytes and decodes the bytes as UTF-8. Added tokens are written
# out as they are, or dropped with `skip_special_tokens=True` when special. Bytes that do not form valid UTF-8,
# such as a single token holding half a character, become U+FFFD, as in HF.

# %%
show_source(BPETokenizer.decode)

# %% tags=["hide-input"]
is_nfc = [unicodedata.normalize("NFC", text) == text for _, text in corpus]
exact = sum(
    ours.decode(ids) == text
    for (_, text), ids, nfc in zip(corpus, ours_ids, is_nfc)
    if nfc
)
composed = sum(
    ours.decode(ids) == unicodedata.normalize("NFC", text)
    for (_, text), ids in zip(corpus, ours_ids)
)
same_as_hf = sum(ours.decode(ids) == hf.decode(ids) for ids in hf_ids)
print(f"exact round trips of NFC text: {exact:,} of {sum(is_nfc):,}")
print(f"decode(encode(text)) == NFC(text): {composed:,} of {len(corpus):,}")
print(f"decode equals HF's: {same_as_hf:,} of {len(corpus):,}")
assert exact == sum(is_nfc) and composed == same_as_hf == len(corpus)

# %% [markdown]
# A character with no token of its own falls apart into byte pieces that decode alone to U+FFFD and together to
# the character; and `skip_special_tokens` drops the special tokens but keeps `<tool_call>`:

# %% tags=["hide-input"]
rare = "𠀀"  # CJK Extension B: no token of its own, so its 4 bytes split
ids = ours.encode(rare)
print(ids, [ours.decode([i]) for i in ids], "->", ours.decode(ids))
assert [ours.decode([i]) for i in ids] == [hf.decode([i]) for i in ids]
assert ours.decode(ids) == rare
chat_ids = ours.encode("<|im_start|>user\nhi<|im_end|><tool_call>")
without_specials = ours.decode(chat_ids, skip_special_tokens=True)
print(repr(without_specials))
assert (
    without_specials
    == hf.decode(chat_ids, skip_special_tokens=True)
    == "user\nhi<tool_call>"
)

# %% [markdown]
# ## The chat template, without jinja
#
# An Instruct model is trained on conversations in ChatML: each message is `<|im_start|>role\n`, the content,
# then `<|im_end|>\n`. HF renders this with a jinja template shipped beside the tokenizer. Its branch for
# conversations without tool definitions is short enough to write out as plain Python:

# %%
show_source(render_chat)

# %%
conversation = [
    {"role": "user", "content": "Write a haiku about tokens."},
    {"role": "assistant", "content": "Bytes merge into words"},
    {"role": "user", "content": "再来一首。"},
]
prompt = render_chat(conversation, add_generation_prompt=True)
print(prompt)
assert DEFAULT_SYSTEM_PROMPT in prompt

# %% [markdown]
# The check runs over nine conversations, from one user turn to tool results, each with and without the
# generation prompt, comparing both the text and the ids (`apply_chat_template(tokenize=True)` returns a dict in
# transformers 5):

# %% tags=["hide-input"]
conversations = {
    "one user turn": [{"role": "user", "content": "Hello!"}],
    "system + user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "multi-turn": conversation,
    "Chinese, system": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，世界 🌏"},
        {"role": "assistant", "content": "你好！"},
    ],
    "system mid-way": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "late"},
        {"role": "user", "content": "b"},
    ],
    "empty contents": [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
    ],
    "code, whitespace": [
        {"role": "user", "content": "fix:\n\tdef f( x ):\n\n  return x"}
    ],
    "tool results": [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"wind": 3}'},
        {"role": "assistant", "content": "21 degrees."},
    ],
    "assistant first": [{"role": "assistant", "content": "I speak first."}],
}
rows = []
for name, messages in conversations.items():
    for generation_prompt in (False, True):
        text = render_chat(messages, add_generation_prompt=generation_prompt)
        hf_text = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        hf_encoded = hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt
        )
        rows.append(
            {
                "conversation": name,
                "generation prompt": generation_prompt,
                "tokens": len(hf_encoded["input_ids"]),
                "same text": text == hf_text,
                "same ids": ours.encode(text) == hf_encoded["input_ids"],
            }
        )
chat_check = pd.DataFrame(rows)
agree = chat_check["same text"] & chat_check["same ids"]
print(
    f"{agree.sum()}/{len(chat_check)} renderings: the same text and the same ids as HF's"
)
assert agree.all()

# %% tags=["remove-input", "hide-output"]
chat_check

# %% [markdown]
# Messages the template cannot take are refused before any rendering, with the reason:

# %% tags=["hide-input"]
bad_conversations = [
    [{"role": "bot", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "assistant", "content": "", "tool_calls": []}],
]
for bad in bad_conversations:
    try:
        render_chat(bad)
    except ValueError as error:
        print("ValueError:", error)
    else:
        raise AssertionError(f"render_chat accepted {bad}")

# %% [markdown]
# ## A limit worth knowing: Unicode versions
#
# `\p{L}` and `\p{N}` are only as good as the Unicode tables behind them, and the two regex engines ship
# different ones: the `regex` package knows characters that the Oniguruma inside `tokenizers` does not yet know.
# For such a character, HF's split treats it as a non-letter while ours treats it as a letter. We count
# the code points where the two splits of a short probe string disagree:

# %% tags=["hide-input"]
tokenizers_split = pre_tokenizers.Split(
    Regex(pattern), behavior="isolated", invert=False
)
disagree = []
for code_point in range(0x110000):
    if 0xD800 <= code_point <= 0xDFFF:  # surrogates cannot appear in UTF-8 text
        continue
    probe = f"a{chr(code_point)}b{chr(code_point)}1"
    if ours.pattern.findall(probe) != [
        w for w, _ in tokenizers_split.pre_tokenize_str(probe)
    ]:
        disagree.append(code_point)
example = chr(disagree[0])
theirs = [w for w, _ in tokenizers_split.pre_tokenize_str(f"a{example}b")]
print(f"{len(disagree):,} code points disagree, the first U+{disagree[0]:04X}:")
print("  ours:", ours.pattern.findall(f"a{example}b"), " tokenizers:", theirs)

# %% [markdown]
# Letters from Unicode 15 and 16, such as Kawi (U+11F04) and Garay (U+10D50), split alike in both engines (checked
# below). As far as such probes show, the code points that disagree are characters assigned after Unicode 16.0
# (September 2024), so text from Qwen2.5's training could not have used them as letters. The corpus
# above draws its random code points from blocks assigned decades ago, so the check does not depend on which
# tables an installation has. On these newest characters our ids may differ from HF's. Both decode to the same
# text, but only HF's ids reproduce Qwen's tokenizer.

# %% tags=["hide-input"]
for letter in ("\U00011f04", "\U00010d50"):
    probe = f"a{letter}b{letter}1"
    assert (
        ours.pattern.findall(probe)
        == [w for w, _ in tokenizers_split.pre_tokenize_str(probe)]
        == [probe[:4], "1"]
    )
assert (
    ours.decode(ours.encode(f"a{example}b"))
    == hf.decode(hf.encode(f"a{example}b"))
    == f"a{example}b"
)
print("Kawi and Garay split alike; the first disagreeing character round-trips in both")

# %% [markdown]
# ## Summary
#
# - Byte-level BPE spells every UTF-8 byte as one of 256 printable characters, so any string encodes; Qwen2.5's
#   151,643 BPE tokens are those 256 plus one per merge.
# - Encoding is: split out added tokens, normalise to NFC, cut words with the pre-tokenizer regex, then merge
#   each word's lowest-ranked adjacent pair until none is left.
# - minqwen's `BPETokenizer` gives HF's ids on 5,000 varied strings, and decodes them back to the NFC text.
# - A Chinese character is typically one 3-byte token; rare characters and most emoji fall apart into byte
#   pieces that decode only together.
# - The ChatML chat template is a short Python function: `<|im_start|>role\n`, content, `<|im_end|>\n`, with
#   Qwen's default system prompt when none is given.
#
# ## Exercises
#
# ````{exercise}
# :label: tokenizer-merge-by-hand
# Encode the word ` minqwen` by hand: list its adjacent pairs and their ranks in `ours.merge_ranks`, apply the
# lowest-ranked pair, and repeat until no pair has a rank. Which tokens do you end with, and what ids do they
# have?
# ````
#
# ```{solution-start} tokenizer-merge-by-hand
# :class: dropdown
# ```

# %%
symbols = list(ours.pre_tokenize(" minqwen")[0])
while True:
    ranks = {
        pair: ours.merge_ranks[pair]
        for pair in zip(symbols, symbols[1:])
        if pair in ours.merge_ranks
    }
    if not ranks:
        break
    left, right = min(ranks, key=ranks.get)
    print(f"pairs {sorted(ranks.values())} -> merge {left} + {right}")
    i = next(
        i for i, pair in enumerate(zip(symbols, symbols[1:])) if pair == (left, right)
    )
    symbols[i : i + 2] = [left + right]
ids = [ours.vocab[s] for s in symbols]
print(symbols, ids)
assert ids == hf.encode(" minqwen")

# %% [markdown]
# Each step takes the pair of lowest rank; the word stops at three tokens, ` min`, `q` and `wen`, because no
# merge joins them: the training corpus never had ` minqwen`. (This loop merges only the first occurrence of a
# pair, which is enough here; `bpe` merges every occurrence.)
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: tokenizer-scripts
# Tokens cost the same compute whatever they hold, so a script that needs more tokens per character costs more
# to process. Encode the same short sentence in English, German, Russian, Chinese, Arabic and Hindi and compare
# UTF-8 bytes per token and characters per token.
# ````
#
# ```{solution-start} tokenizer-scripts
# :class: dropdown
# ```

# %%
sentences = {
    "English": "The weather is nice today, so we are going to the park.",
    "German": "Das Wetter ist heute schön, also gehen wir in den Park.",
    "Russian": "Сегодня хорошая погода, поэтому мы идём в парк.",
    "Chinese": "今天天气很好，所以我们去公园。",
    "Arabic": "الطقس جميل اليوم، لذلك سنذهب إلى الحديقة.",
    "Hindi": "आज मौसम अच्छा है, इसलिए हम पार्क जा रहे हैं।",
}
rows = {}
for language, text in sentences.items():
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    rows[language] = {
        "characters": len(text),
        "tokens": len(ids),
        "bytes per token": round(len(text.encode()) / len(ids), 2),
        "characters per token": round(len(text) / len(ids), 2),
    }
per_script = pd.DataFrame.from_dict(rows, orient="index")
per_script

# %% [markdown]
# English and German pack about four characters into a token. A Chinese token holds about two characters, and
# with 3 bytes per character it carries the most bytes. Scripts with less training text fall back to smaller
# pieces: in Hindi a token is about one character, fewer bytes than a character's 3, so the same sentence costs
# three times as many tokens as in English.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: tokenizer-template-overhead
# How many tokens does the chat template add around a one-word user message, with the default system prompt,
# and how many with an empty system prompt?
# ````
#
# ```{solution-start} tokenizer-template-overhead
# :class: dropdown
# ```

# %%
word_tokens = len(ours.encode("Hello"))
template = {}
for system in ("default", ""):
    messages = [{"role": "user", "content": "Hello"}]
    if system != "default":
        messages.insert(0, {"role": "system", "content": system})
    ids = ours.encode(render_chat(messages, add_generation_prompt=True))
    reference = hf.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == reference["input_ids"]
    name = system or "empty"
    template[name] = len(ids) - word_tokens
    print(f"{name} system prompt: {len(ids)} tokens, {template[name]} template")
assert template["empty"] == 5 + 5 + 3  # system turn, user turn, generation prompt

# %% [markdown]
# Each message costs five tokens of template (`<|im_start|>`, the role, a newline, `<|im_end|>` and a newline),
# and the generation prompt three (`<|im_start|>`, `assistant`, a newline): 13 with an empty system prompt. The
# default system prompt adds its sentence, 16 tokens more. In a long chat the template is cheap; for a one-line
# prompt it is most of the input.
#
# ```{solution-end}
# ```
