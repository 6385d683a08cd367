"""Chapter 1: `minqwen.generate` returns the tokens of HF `generate()`, cached or not, batched or single.

The contract: `minqwen.generate(model, ids, n, **kw)` equals `torch.manual_seed(seed); hf.generate(ids,
max_new_tokens=n, **kw)` for any `kw`, including none, because both resolve what `kw` leaves out from the
checkpoint's generation_config.json and then from transformers' own defaults. Each test runs the loop on
minqwen's model and on HF's (through `HFAdapter`), so the loop is proven apart from the model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_INSTRUCT_GENERATION, hf_generate, left_pad, random_prompts

import minqwen
from minqwen.engine.request import NumericalError, prepare
from minqwen.tools.hf_adapter import HFAdapter

SETTINGS = {
    "greedy": dict(do_sample=False),
    "greedy+penalty": dict(do_sample=False, repetition_penalty=1.3),
    "pure sampling": dict(do_sample=True),
    "instruct defaults": dict(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
    ),
    "hot min-p": dict(
        do_sample=True, temperature=1.5, top_p=0.95, min_p=0.1, repetition_penalty=0.8
    ),
    "top-k 1": dict(do_sample=True, top_k=1),
    "top-k off": dict(do_sample=True, top_k=0, top_p=0.9),
}


@pytest.fixture(params=["minqwen", "hf"])
def tiny_model(request, tiny_hf, tiny_ours):
    return tiny_ours if request.param == "minqwen" else HFAdapter(tiny_hf)


@pytest.fixture(params=["minqwen", "hf"])
def instruct_model(request, tiny_instruct_hf, tiny_instruct_ours):
    return tiny_instruct_ours if request.param == "minqwen" else HFAdapter(tiny_instruct_hf)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_single_prompt_equals_hf_generate(tiny_model, tiny_hf, name, use_cache):
    ids = torch.tensor(random_prompts(11, [9]))
    kw = dict(eos_token_id=[], use_cache=use_cache, **SETTINGS[name])
    expected = hf_generate(tiny_hf, ids, 16, seed=4, **kw)
    assert torch.equal(minqwen.generate(tiny_model, ids, 16, seed=4, **kw), expected)


@pytest.mark.parametrize("name", SETTINGS)
def test_left_padded_batch_equals_hf_generate(tiny_model, tiny_hf, name):
    ids, mask = left_pad(random_prompts(12, [3, 10, 6]))
    kw = dict(attention_mask=mask, eos_token_id=[], **SETTINGS[name])
    expected = hf_generate(tiny_hf, ids, 16, seed=9, mask=mask, **SETTINGS[name], eos_token_id=[])
    assert torch.equal(minqwen.generate(tiny_model, ids, 16, seed=9, **kw), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_arguments_at_all_equals_hf_generate(instruct_model, tiny_instruct_hf, seed):
    """Sampling on, temperature, top-k, top-p, penalty and end tokens: all from generation_config.json."""
    ids, mask = left_pad(random_prompts(20 + seed, [4, 9, 2]))
    expected = hf_generate(tiny_instruct_hf, ids, 24, seed=seed, mask=mask)
    ours = minqwen.generate(instruct_model, ids, 24, seed=seed, attention_mask=mask)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    "passed", [dict(do_sample=False), dict(temperature=1.3), dict(top_k=0, top_p=0.5)]
)
def test_a_passed_setting_wins_over_the_checkpoint(instruct_model, tiny_instruct_hf, passed):
    ids = torch.tensor(random_prompts(30, [6]))
    expected = hf_generate(tiny_instruct_hf, ids, 16, seed=3, **passed)
    assert torch.equal(minqwen.generate(instruct_model, ids, 16, seed=3, **passed), expected)


def test_defaults_resolve_like_transformers(tiny_ours, tiny_instruct_ours):
    """The tiny model's generation_config sets no sampling: transformers' defaults (top_k 50!) apply."""
    ids = torch.tensor([[5, 6]])
    plain = prepare(tiny_ours.config, ids, 4)
    assert (plain.sampling.do_sample, plain.sampling.top_k, plain.sampling.temperature) == (
        False,
        50,
        1.0,
    )
    assert (plain.eos_ids, plain.pad_id) == ((2,), 0)
    instruct = prepare(tiny_instruct_ours.config, ids, 4)
    expected = {k: v for k, v in TINY_INSTRUCT_GENERATION.items() if k in vars(instruct.sampling)}
    assert {k: getattr(instruct.sampling, k) for k in expected} == expected
    assert (instruct.eos_ids, instruct.pad_id) == ((7, 2), 0)
    assert prepare(tiny_instruct_ours.config, ids, 4, eos_token_id=[9, 3]).eos_ids == (9, 3)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_each_row_of_a_batch_equals_its_prompt_alone(tiny_model, use_cache, penalty):
    prompts = random_prompts(13, [2, 11, 5])
    ids, mask = left_pad(prompts)
    kw = dict(eos_token_id=[], use_cache=use_cache, repetition_penalty=penalty)
    batch = minqwen.generate(tiny_model, ids, 12, attention_mask=mask, **kw)
    for row, prompt in enumerate(prompts):
        alone = minqwen.generate(tiny_model, torch.tensor([prompt]), 12, **kw)
        assert batch[row, -12:].tolist() == alone[0, -12:].tolist()


def test_cached_and_uncached_agree(tiny_model):
    ids, mask = left_pad(random_prompts(14, [4, 7]))
    kw = dict(attention_mask=mask, eos_token_id=[], do_sample=True, seed=3)
    cached = minqwen.generate(tiny_model, ids, 20, **kw)
    assert torch.equal(cached, minqwen.generate(tiny_model, ids, 20, use_cache=False, **kw))


@pytest.mark.parametrize("do_sample", [False, True])
def test_rows_that_finish_early_are_padded_like_hf(instruct_model, tiny_instruct_hf, do_sample):
    """End tokens the rows produce at different steps; the pad id (0) is not the first end token."""
    ids, mask = left_pad(random_prompts(15, [5, 9, 3]))
    kw = dict(attention_mask=mask, seed=2, do_sample=do_sample)
    free_run = minqwen.generate(instruct_model, ids, 20, eos_token_id=[], **kw)
    width = ids.shape[1]
    eos = [int(free_run[0, width + 3]), int(free_run[1, width + 8])]
    expected = hf_generate(
        tiny_instruct_hf, ids, 20, seed=2, mask=mask, do_sample=do_sample, eos_token_id=eos
    )
    ours = minqwen.generate(instruct_model, ids, 20, eos_token_id=eos, **kw)
    assert torch.equal(ours, expected)
    first_end = min(ours[0, width:].tolist().index(e) for e in eos if e in ours[0, width:])
    assert first_end < ours.shape[1] - width - 1, "row 0 should finish before the others"
    assert set(ours[0, width + first_end + 1 :].tolist()) == {0}, "finished rows carry the pad id"


def test_stops_when_every_row_is_done(tiny_model):
    ids = torch.tensor(random_prompts(16, [6]))
    free_run = minqwen.generate(tiny_model, ids, 10, eos_token_id=[])
    eos = int(free_run[0, -8])
    out = minqwen.generate(tiny_model, ids, 10, eos_token_id=eos)
    assert out.shape[1] < free_run.shape[1] and int(out[0, -1]) == eos


def test_generate_tokens_yields_one_column_per_step(tiny_model):
    ids, mask = left_pad(random_prompts(17, [3, 5]))
    kw = dict(attention_mask=mask, eos_token_id=[])
    steps = list(minqwen.generate_tokens(tiny_model, ids, 5, **kw))
    assert [tuple(s.shape) for s in steps] == [(2,)] * 5
    full = minqwen.generate(tiny_model, ids, 5, **kw)
    assert torch.equal(torch.stack(steps, dim=1), full[:, ids.shape[1] :])


def test_zero_new_tokens_returns_the_prompt(tiny_model):
    ids = torch.tensor(random_prompts(18, [4]))
    assert torch.equal(minqwen.generate(tiny_model, ids, 0), ids)


def test_top_k_larger_than_vocab_is_fine(tiny_model, tiny_hf):
    ids = torch.tensor(random_prompts(19, [5]))
    kw = dict(do_sample=True, top_k=10_000, eos_token_id=[])
    expected = hf_generate(tiny_hf, ids, 8, seed=1, **kw)
    assert torch.equal(minqwen.generate(tiny_model, ids, 8, seed=1, **kw), expected)


def test_nan_logits_stop_generation_with_the_step(tiny_checkpoint):
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN or infinity at new token 0"):
        minqwen.generate(model, torch.tensor([[5, 6, 7]]), 4)


class ForwardCalled(AssertionError):
    pass


@pytest.fixture
def guarded_model(tiny_ours):
    """tiny_ours, rigged to fail loudly if a forward pass starts: bad input must be caught before any."""

    def refuse(*_):
        raise ForwardCalled("a forward pass ran before the input was checked")

    handle = tiny_ours.register_forward_pre_hook(refuse)
    yield tiny_ours
    handle.remove()


PROMPT = torch.tensor([[5, 6, 7]])
BAD_INPUT = {
    "negative temperature": (dict(do_sample=True, temperature=-1.0), "temperature must be >= 0"),
    "tiny temperature": (dict(do_sample=True, temperature=1e-40), "between 0.001 and 1000"),
    "infinite temperature": (dict(do_sample=True, temperature=float("inf")), "between 0.001"),
    "top_p 0": (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    "top_p 1.2": (dict(do_sample=True, top_p=1.2), r"top_p must be in \(0, 1\]"),
    "top_k negative": (dict(do_sample=True, top_k=-3), "top_k must be an int >= 0"),
    "min_p negative": (dict(do_sample=True, min_p=-0.5), r"min_p must be in \[0, 1\]"),
    "min_p 2": (dict(do_sample=True, min_p=2.0), r"min_p must be in \[0, 1\]"),
    "penalty 0": (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    "eos outside the vocabulary": (dict(eos_token_id=[2, 500]), "eos_token_id must be token ids"),
    "pad outside the vocabulary": (dict(pad_token_id=-1), "pad_token_id must be token ids"),
    "seed not an int": (dict(seed="7"), "seed must be an int"),
}
BAD_IDS = {
    "negative max_new_tokens": (PROMPT, -1, "max_new_tokens must be an int >= 0"),
    "empty prompt": (torch.zeros(1, 0, dtype=torch.long), 4, "the prompt is empty"),
    "empty batch": (torch.zeros(0, 3, dtype=torch.long), 4, "the batch is empty"),
    "1-D ids": (torch.tensor([5, 6, 7]), 4, "2-D LongTensor"),
    "too long": (PROMPT, 254, r"= 257 exceeds the model's max_position_embeddings \(256\)"),
    "id past the vocabulary": (torch.tensor([[5, 128]]), 4, r"input_ids\[0, 1\] = 128"),
    "negative id": (torch.tensor([[-1, 5]]), 4, r"input_ids\[0, 0\] = -1 is not a token id"),
    "huge id": (torch.tensor([[5, 10**12]]), 4, "vocabulary is 0..127"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
@pytest.mark.parametrize("entry", [minqwen.generate, minqwen.generate_tokens])
def test_bad_settings_raise_before_any_forward(guarded_model, entry, case):
    kwargs, message = BAD_INPUT[case]
    with pytest.raises(ValueError, match=message):
        entry(guarded_model, PROMPT, 4, **kwargs)


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_ids_raise_before_any_forward(guarded_model, case):
    ids, new_tokens, message = BAD_IDS[case]
    with pytest.raises(ValueError, match=message):
        minqwen.generate(guarded_model, ids, new_tokens)


def test_prompt_plus_new_tokens_may_reach_max_positions_exactly(tiny_ours):
    assert minqwen.generate(tiny_ours, PROMPT, 253, eos_token_id=[]).shape == (1, 256)


# The real model: prompts and settings that none of the chapter 1 notebooks uses.
EMBEDDED_PROMPTS = [
    "用一句话解释什么是递归。",
    "Write a SQL query that counts the rows of a table named users.",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return encoded["input_ids"]


def test_embedded_defaults_equal_hf(embedded_hf, embedded_ours, embedded_tokenizer):
    """No settings at all: both sample with the checkpoint's temperature, top-k, top-p and penalty."""
    ids = torch.tensor([chat_ids(embedded_tokenizer, EMBEDDED_PROMPTS[0])])
    expected = hf_generate(embedded_hf, ids, 10, seed=123)
    assert torch.equal(minqwen.generate(embedded_ours, ids, 10, seed=123), expected)


def test_embedded_greedy_batch_equals_hf(embedded_hf, embedded_ours, embedded_tokenizer):
    """`do_sample=False` alone: greedy, with the checkpoint's repetition penalty of 1.05, as in HF."""
    prompts = [chat_ids(embedded_tokenizer, text) for text in EMBEDDED_PROMPTS]
    ids, mask = left_pad(prompts, pad=embedded_hf.generation_config.pad_token_id)
    expected = hf_generate(embedded_hf, ids, 8, mask=mask, do_sample=False)
    ours = minqwen.generate(embedded_ours, ids, 8, attention_mask=mask, do_sample=False)
    assert torch.equal(ours, expected)
