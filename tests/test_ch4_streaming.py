"""Chapter 4: streaming text. Multi-byte characters split across tokens, stop strings split across tokens, EOS."""

import pytest
import torch
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import minqwen
from minqwen.engine.generate import generate
from minqwen.engine.streaming import REPLACEMENT, Detokenizer, StopMatcher, stream

MULTI_BYTE = ["你好，世界", "龘 and 鱻", "🦜🫠🧑‍💻", "𠀀 mixed é Ω 🇯🇵!", "日本語のテキスト😀"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minqwen.weights.ASSETS)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_with_tokenizer):
    return minqwen.Qwen2.from_pretrained(tiny_checkpoint_with_tokenizer)


def pieces_of(tokenizer, ids):
    detokenizer = Detokenizer(tokenizer)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """Synthetic ids: one byte-level token per UTF-8 byte, so every multi-byte character is split."""
    byte_to_char = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in text.encode()])


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_real_tokenization_streams_whole_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = pieces_of(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_one_token_per_byte_streams_whole_characters(tokenizer, text):
    ids = byte_token_ids(tokenizer, text)
    assert len(ids) == len(text.encode())
    pieces = pieces_of(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)
    # A character comes out exactly when its last byte arrives, never earlier and never later.
    emitted_after = [len("".join(pieces[: i + 1]).encode()) for i in range(len(ids))]
    boundaries = {len(text[:k].encode()) for k in range(len(text) + 1)}
    assert all(n in boundaries and n <= i + 1 for i, n in enumerate(emitted_after))
    assert [n for i, n in enumerate(emitted_after) if n == i + 1] == sorted(boundaries - {0})


def test_split_character_is_held_until_its_last_byte(tokenizer):
    first, last = tokenizer("龘", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([first]) == REPLACEMENT
    detokenizer = Detokenizer(tokenizer)
    assert detokenizer.push(first) == ""
    assert detokenizer.push(last) == "龘"


def test_flush_releases_bytes_that_never_complete(tokenizer):
    detokenizer = Detokenizer(tokenizer)
    assert detokenizer.push(tokenizer.convert_tokens_to_ids("a")) == "a"
    assert detokenizer.push(byte_token_ids(tokenizer, "🙂")[0]) == ""
    assert detokenizer.flush() == REPLACEMENT


def test_invalid_byte_followed_by_text_is_not_held_forever(tokenizer):
    lone = byte_token_ids(tokenizer, "é")[0]  # a lead byte with no continuation
    ids = [lone, *tokenizer(" ok", add_special_tokens=False)["input_ids"]]
    pieces = pieces_of(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == REPLACEMENT + " ok"
    assert pieces[-1] == ""


def test_special_tokens_are_skipped_unless_asked_for(tokenizer):
    ids = [
        *tokenizer("hi", add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    assert "".join(pieces_of(tokenizer, ids)) == "hi"
    detokenizer = Detokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(detokenizer.push(i) for i in ids) == "hi<|im_end|>"


def feed_all(matcher, chunks):
    out = [matcher.feed(c) for c in chunks]
    if not matcher.stopped:
        out.append(matcher.flush())
    return out


def test_stop_string_straddling_chunks_is_cut_and_never_emitted():
    matcher = StopMatcher(["###"])
    out = feed_all(matcher, ["Hello #", "#", "# world"])
    assert out == ["Hello ", "", ""] and matcher.stopped


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopMatcher(["</end>"])
    out = feed_all(matcher, ["a </", "en", "try> b"])
    assert out == ["a ", "", "</entry> b", ""] and not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["world", "lo w"])
    assert feed_all(matcher, ["hello", " world"]) == ["hel", ""]


def test_overlapping_stop_prefix():
    matcher = StopMatcher(["aab"])
    assert feed_all(matcher, ["a", "a", "a", "b"]) == ["", "", "a", ""]


def test_stop_string_in_the_first_piece():
    matcher = StopMatcher(["\n\n"])
    assert feed_all(matcher, ["\n\nrest"]) == [""]


@pytest.fixture(scope="module")
def free_run(tiny, tokenizer):
    """A greedy run of the tiny model with no end token: the reference the stopped runs are cut from."""
    prompt = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    new = generate(tiny, prompt, 40, eos_token_id=[], do_sample=False)[
        0, prompt.shape[1] :
    ].tolist()
    return prompt, new


def test_stream_without_stops_equals_decode(tiny, tokenizer, free_run):
    prompt, new = free_run
    pieces = stream(tiny, tokenizer, prompt, len(new), eos_token_id=[])
    assert "".join(pieces) == tokenizer.decode(new, skip_special_tokens=True) == pieces.text
    assert pieces.finish_reason == "length" and pieces.token_ids == new


def test_stream_stops_on_a_stop_string_that_straddles_tokens(tiny, tokenizer, free_run):
    prompt, new = free_run
    texts = [tokenizer.decode([t]) for t in new]
    i = next(
        i
        for i in range(5, len(new) - 1)
        if texts[i].strip() and texts[i + 1].strip() and REPLACEMENT not in texts[i] + texts[i + 1]
    )
    stop = texts[i][-1] + texts[i + 1][0]
    full = tokenizer.decode(new)
    pieces = stream(tiny, tokenizer, prompt, len(new), stop=stop, eos_token_id=[])
    assert "".join(pieces) == full[: full.index(stop)]
    assert pieces.finish_reason == "stop"
    assert stop not in pieces.text and len(pieces.token_ids) <= i + 2


def test_stream_stops_on_eos_and_does_not_emit_it(tiny, tokenizer, free_run):
    prompt, new = free_run
    eos = new[10]
    first = new.index(eos)
    pieces = stream(tiny, tokenizer, prompt.tolist()[0], 40, eos_token_id=eos)
    assert "".join(pieces) == tokenizer.decode(new[:first], skip_special_tokens=True)
    assert pieces.finish_reason == "eos" and pieces.token_ids == new[: first + 1]


def test_stream_takes_text_and_sampling_keywords(tiny, tokenizer):
    runs = [
        list(stream(tiny, tokenizer, "你好", 12, eos_token_id=[], do_sample=True, top_k=50, seed=3))
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and "".join(runs[0])


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        (torch.ones(2, 3, dtype=torch.long), {}, "batch of 2"),
        ("", {}, "prompt is empty"),
        ([], {}, "non-empty"),
        ("hi", {"stop": [""]}, "stop strings"),
        ("hi", {"top_p": 2.0}, "top_p"),
        ("hi", {"max_new_tokens": 10_000}, "max_position_embeddings"),
    ],
)
def test_bad_input_is_rejected(tiny, tokenizer, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        stream(tiny, tokenizer, prompt, **kwargs)


def test_embedded_model_streams_chinese_without_broken_characters(
    embedded_ours, embedded_tokenizer
):
    messages = [{"role": "user", "content": "用一句话介绍长城，加一个表情符号。"}]
    ids = embedded_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    pieces = stream(embedded_ours, embedded_tokenizer, ids, 20, eos_token_id=[151645, 151643])
    chunks = list(pieces)
    assert not any(REPLACEMENT in c for c in chunks)
    assert "".join(chunks) == embedded_tokenizer.decode(pieces.token_ids, skip_special_tokens=True)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in pieces.text)


@pytest.fixture(scope="module")
def bpe():
    return minqwen.BPETokenizer.from_file(minqwen.weights.ASSETS)


@pytest.mark.parametrize("prompt", ["你好，世界", "The quick brown fox"])
def test_minqwens_own_tokenizer_streams_like_hfs(tiny, tokenizer, bpe, prompt):
    """Text or ids, minqwen's BPETokenizer gives the stream HF's tokenizer gives."""
    settings = dict(eos_token_id=[], do_sample=True, seed=5)
    theirs = stream(tiny, tokenizer, prompt, 16, **settings)
    ours_text = stream(tiny, bpe, prompt, 16, **settings)
    ours_ids = stream(tiny, bpe, bpe.encode(prompt), 16, **settings)
    expected = list(theirs)
    assert list(ours_text) == expected and list(ours_ids) == expected


def test_the_fast_engine_streams_what_the_eager_loop_does(tiny, bpe):
    settings = dict(eos_token_id=[], do_sample=True, seed=2)
    eager = stream(tiny, bpe, "Once upon a time", 20, **settings)
    fast = stream(minqwen.FastQwen2(tiny, bucket=32), bpe, "Once upon a time", 20, **settings)
    assert list(fast) == list(eager) and fast.token_ids == eager.token_ids


def test_a_finished_stream_keeps_its_finish_reason(tiny, tokenizer, free_run):
    prompt, new = free_run
    pieces = stream(tiny, tokenizer, prompt, 40, eos_token_id=new[3])
    text = "".join(pieces)
    assert pieces.finish_reason == "eos"
    assert list(pieces) == [] and pieces.finish_reason == "eos" and pieces.text == text
    assert len(pieces.token_times) == len(pieces.token_ids)
