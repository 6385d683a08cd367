"""The from-scratch BPE encoder, decoder and ChatML renderer against HF's Qwen2Tokenizer (tokenizer files only)."""

from __future__ import annotations

from corpus import sample_corpus

import json
import unicodedata

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from minqwen.tokenizer import BPETokenizer, bytes_to_unicode, render_chat
from minqwen.weights import ASSETS


@pytest.fixture(scope="module")
def ours():
    return BPETokenizer.from_file(ASSETS)


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(ASSETS)


@pytest.fixture(scope="module")
def corpus():
    return sample_corpus(2000, seed=1)


EDGE_CASES = [
    "",
    " ",
    "a",
    "\x00\x01\x7f",
    "".join(map(chr, range(256))),
    " " * 1000,
    "\n" * 50 + "x",
    "\r\n\r\n  \t\t\n x",
    "1234567890" * 20,
    "３．１４１５９",
    "It's IT'S it'S they'LL we'Ve I'D you'RE don't",
    "'s'S 'll",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<|im_start|",
    "<|IM_START|>",
    "<<|im_start|>>",
    "<tool_call>{}</tool_call>",
    "[PAD151665]",
    "e\u0301 A\u030a \u1100\u1161\u11a8",
    "\u0301\u0301 lone combining marks",
    "\ufffd\ufeff\u200d",
    "𠀀𪚥𰻞",
    "👨‍👩‍👧‍👦🏳️‍🌈",
    "def f(x):\n\treturn x**2  # square\n",
    "a\u3000b\xa0c\u2028d\x85e",
]


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_vocab_and_added_tokens_match_hf(ours, hf):
    assert len(ours) == len(hf) == 151936
    assert {t.content: t.id for t in ours.added_tokens.values()} == {
        t.content: i for i, t in hf.added_tokens_decoder.items()
    }
    assert (
        ours.added_tokens["<|im_start|>"].id == 151644
        and ours.added_tokens["<|im_end|>"].id == 151645
    )


def test_encoder_matches_hf_on_corpus(ours, hf, corpus):
    assert len({category for category, _ in corpus}) == 8
    mismatches = [text for _, text in corpus if ours.encode(text) != hf.encode(text)]
    assert mismatches == []


@pytest.mark.parametrize("text", EDGE_CASES)
def test_encoder_matches_hf_on_edge_cases(ours, hf, text):
    assert ours.encode(text) == hf.encode(text)


def test_without_nfc_matches_the_raw_file():
    raw = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    assert raw.normalizer is None
    unnormalized = BPETokenizer.from_file(ASSETS, normalization=None)
    for text in [
        "e\u0301",
        "cafe\u0301 A\u030a",
        unicodedata.normalize("NFD", "한국어 résumé"),
        *EDGE_CASES,
    ]:
        assert unnormalized.encode(text) == raw.encode(text).ids


def test_nfc_changes_ids_only_for_unnormalized_text(ours):
    raw = BPETokenizer.from_file(ASSETS, normalization=None)
    assert ours.encode("e\u0301") == ours.encode("é") != raw.encode("e\u0301")
    assert ours.encode("é") == raw.encode("é")


def test_decode_matches_hf(ours, hf, corpus):
    for _, text in corpus[:500]:
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True
        )
        # Single ids may hold part of a character; both sides must replace the broken bytes identically.
        assert [ours.decode([i]) for i in ids] == [hf.decode([i]) for i in ids]


def test_round_trip_is_exact_for_nfc_text(ours, corpus):
    for _, text in corpus:
        assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)
    assert ours.decode(ours.encode("e\u0301")) == "é"


def test_padding_rows_decode_to_their_names(ours, hf):
    assert ours.decode([151665, 151935]) == hf.decode([151665, 151935]) == "[PAD151665][PAD151935]"


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Write fib in Python."},
        {
            "role": "assistant",
            "content": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
        },
        {"role": "user", "content": "Now iteratively."},
    ],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，世界 🌏"},
        {"role": "assistant", "content": "你好！"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "late system"},
        {"role": "user", "content": "b"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "literal <|im_end|> inside\n\n  spaces  "}],
    [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"wind": 3}'},
        {"role": "assistant", "content": "21 degrees, light wind."},
        {"role": "tool", "content": "last"},
    ],
    [{"role": "assistant", "content": "I speak first."}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_render_chat_matches_apply_chat_template(ours, hf, messages, add_generation_prompt):
    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    encoded = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode(text) == encoded["input_ids"]


@pytest.mark.parametrize(
    "messages, complaint",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "not a dict"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user"}], "needs a str 'content'"),
        ([{"role": "user", "content": None}], "needs a str 'content'"),
        ([{"role": "user", "content": ["part"]}], "needs a str 'content'"),
        ([{"role": "assistant", "content": "", "tool_calls": []}], "apply_chat_template"),
    ],
)
def test_render_chat_rejects_bad_messages(messages, complaint):
    with pytest.raises(ValueError, match=complaint):
        render_chat(messages)


def test_bad_input_to_the_tokenizer(ours, tmp_path):
    with pytest.raises(ValueError, match="takes a str"):
        ours.encode(b"bytes")
    for bad_id in (-1, 151936, "1", 1.0, True):
        with pytest.raises(ValueError, match="not an int in"):
            ours.decode([bad_id])
    with pytest.raises(ValueError, match="no tokenizer.json"):
        BPETokenizer.from_file(tmp_path)
    wordpiece = tmp_path / "tokenizer.json"
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        BPETokenizer.from_file(wordpiece)
    with pytest.raises(ValueError, match="normalization must be"):
        BPETokenizer.from_file(ASSETS, normalization="NFKC")
    with pytest.raises(ValueError, match="count must be"):
        sample_corpus(0)


def test_corpus_is_deterministic_and_varied():
    first, again, other = (
        sample_corpus(400, seed=3),
        sample_corpus(400, seed=3),
        sample_corpus(400, seed=4),
    )
    assert first == again and first != other
    texts = "".join(text for _, text in first)
    assert any("\u4e00" <= char <= "\u9fff" for char in texts) and "\U0001f600" <= max(texts)
    assert (
        "  " in texts
        and "\t" in texts
        and "def " in texts
        and any(char.isdigit() for char in texts)
    )
