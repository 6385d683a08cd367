"""Chapter 1: `minqwen.generate` returns the tokens of HF `generate()`, cached or not, batched or single."""

from __future__ import annotations

import pytest
import torch

import minqwen
from minqwen.generate import stop_tokens

PAD = 0  # the tiny checkpoints' pad id (tests/conftest.py)

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
}
NEUTRAL = dict(
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0
)


def hf_generate(model, ids, mask, max_new_tokens, seed, eos, pad, use_cache=True, **settings):
    """HF generate with every setting explicit, so no default of the model's generation_config leaks in."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            eos_token_id=eos,
            pad_token_id=pad,
            **{**NEUTRAL, **settings},
        )


def left_pad(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def random_prompts(seed: int, lengths) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(params=["hf", "minqwen"])
def tiny_model(request, tiny_hf, tiny_ours):
    return tiny_hf if request.param == "hf" else tiny_ours


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_single_prompt_equals_hf_generate(tiny_model, tiny_hf, name, use_cache):
    ids = torch.tensor(random_prompts(11, [9]))
    expected = hf_generate(
        tiny_hf,
        ids,
        torch.ones_like(ids),
        16,
        seed=4,
        eos=[],
        pad=PAD,
        use_cache=use_cache,
        **SETTINGS[name],
    )
    ours = minqwen.generate(
        tiny_model, ids, 16, seed=4, eos_token_id=[], use_cache=use_cache, **SETTINGS[name]
    )
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", SETTINGS)
def test_left_padded_batch_equals_hf_generate(tiny_model, tiny_hf, name):
    ids, mask = left_pad(random_prompts(12, [3, 10, 6]))
    expected = hf_generate(tiny_hf, ids, mask, 16, seed=9, eos=[], pad=PAD, **SETTINGS[name])
    ours = minqwen.generate(
        tiny_model, ids, 16, seed=9, attention_mask=mask, eos_token_id=[], **SETTINGS[name]
    )
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_each_row_of_a_batch_equals_its_prompt_alone(tiny_model, use_cache, penalty):
    prompts = random_prompts(13, [2, 11, 5])
    ids, mask = left_pad(prompts)
    batch = minqwen.generate(
        tiny_model,
        ids,
        12,
        attention_mask=mask,
        eos_token_id=[],
        use_cache=use_cache,
        repetition_penalty=penalty,
    )
    for row, prompt in enumerate(prompts):
        alone = minqwen.generate(
            tiny_model,
            torch.tensor([prompt]),
            12,
            eos_token_id=[],
            use_cache=use_cache,
            repetition_penalty=penalty,
        )
        assert batch[row, -12:].tolist() == alone[0, -12:].tolist()


def test_cached_and_uncached_agree(tiny_model):
    ids, mask = left_pad(random_prompts(14, [4, 7]))
    cached = minqwen.generate(tiny_model, ids, 20, attention_mask=mask, eos_token_id=[])
    uncached = minqwen.generate(
        tiny_model, ids, 20, attention_mask=mask, eos_token_id=[], use_cache=False
    )
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("do_sample", [False, True])
def test_eos_stops_rows_and_pads_them_like_hf(tiny_model, tiny_hf, do_sample):
    ids, mask = left_pad(random_prompts(15, [5, 9, 3]))
    free_run = minqwen.generate(
        tiny_model, ids, 20, attention_mask=mask, eos_token_id=[], seed=2, do_sample=do_sample
    )
    # An end token the first row produces at its 4th step, so at least that row stops early.
    eos = int(free_run[0, ids.shape[1] + 3])
    expected = hf_generate(tiny_hf, ids, mask, 20, seed=2, eos=eos, pad=PAD, do_sample=do_sample)
    ours = minqwen.generate(
        tiny_model, ids, 20, attention_mask=mask, eos_token_id=eos, seed=2, do_sample=do_sample
    )
    assert torch.equal(ours, expected)
    first_eos = ours[0, ids.shape[1] :].tolist().index(eos)
    assert all(t == PAD for t in ours[0, ids.shape[1] + first_eos + 1 :].tolist())


def test_stops_when_every_row_is_done(tiny_model):
    ids = torch.tensor(random_prompts(16, [6]))
    free_run = minqwen.generate(tiny_model, ids, 10, eos_token_id=[])
    eos = int(free_run[0, -8])
    out = minqwen.generate(tiny_model, ids, 10, eos_token_id=eos)
    assert out.shape[1] < free_run.shape[1] and int(out[0, -1]) == eos


def test_eos_defaults_to_the_model(tiny_hf, tiny_ours):
    """Both read generation_config.json: its end tokens, and its pad id for finished rows."""
    for model in (tiny_hf, tiny_ours):
        assert stop_tokens(model) == ([2], 0)
        assert stop_tokens(model, [7, 9]) == ([7, 9], 0)


def test_generate_tokens_yields_one_column_per_step(tiny_model):
    ids, mask = left_pad(random_prompts(17, [3, 5]))
    steps = list(minqwen.generate_tokens(tiny_model, ids, 5, attention_mask=mask, eos_token_id=[]))
    assert [tuple(s.shape) for s in steps] == [(2,)] * 5
    full = minqwen.generate(tiny_model, ids, 5, attention_mask=mask, eos_token_id=[])
    assert torch.equal(torch.stack(steps, dim=1), full[:, ids.shape[1] :])


def test_zero_new_tokens_returns_the_prompt(tiny_model):
    ids = torch.tensor(random_prompts(18, [4]))
    assert torch.equal(minqwen.generate(tiny_model, ids, 0), ids)


def test_top_k_larger_than_vocab_is_fine(tiny_model, tiny_hf):
    ids = torch.tensor(random_prompts(19, [5]))
    ours = minqwen.generate(
        tiny_model, ids, 8, do_sample=True, top_k=10_000, seed=1, eos_token_id=[]
    )
    expected = hf_generate(
        tiny_hf, ids, torch.ones_like(ids), 8, seed=1, eos=[], pad=PAD, do_sample=True, top_k=10_000
    )
    assert torch.equal(ours, expected)


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


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda m: minqwen.generate(m, PROMPT, 4, do_sample=True, temperature=-1.0),
            "temperature must be >= 0",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, do_sample=True, top_p=0.0),
            r"top_p must be in \(0, 1\]",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, do_sample=True, top_p=1.2),
            r"top_p must be in \(0, 1\]",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, do_sample=True, top_k=-3),
            "top_k must be an int >= 0",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, do_sample=True, min_p=-0.5),
            r"min_p must be in \[0, 1\]",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, do_sample=True, min_p=2.0),
            r"min_p must be in \[0, 1\]",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, repetition_penalty=0.0),
            "repetition_penalty must be > 0",
        ),
        (lambda m: minqwen.generate(m, PROMPT, -1), "max_new_tokens must be an int >= 0"),
        (
            lambda m: minqwen.generate(m, torch.zeros(1, 0, dtype=torch.long), 4),
            "the prompt is empty",
        ),
        (
            lambda m: minqwen.generate(m, torch.zeros(0, 3, dtype=torch.long), 4),
            "the batch is empty",
        ),
        (lambda m: minqwen.generate(m, torch.tensor([5, 6, 7]), 4), "2-D LongTensor"),
        (
            lambda m: minqwen.generate(
                m, PROMPT, 4, attention_mask=torch.ones(1, 4, dtype=torch.long)
            ),
            r"attention_mask has shape \(1, 4\) but input_ids has \(1, 3\)",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, attention_mask=torch.tensor([[1, 1, 0]])),
            "right padding.*left padding",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 4, attention_mask=torch.tensor([[0, 0, 0]])),
            "all padding",
        ),
        (
            lambda m: minqwen.generate(m, PROMPT, 254),
            r"= 257 exceeds the model's max_position_embeddings \(256\)",
        ),
        (
            lambda m: minqwen.generate_tokens(m, PROMPT, 4, do_sample=True, top_p=0.0),
            r"top_p must be in \(0, 1\]",
        ),
    ],
)
def test_bad_input_raises_before_any_forward(guarded_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(guarded_model)


def test_prompt_plus_new_tokens_may_reach_max_positions_exactly(tiny_ours):
    assert minqwen.generate(tiny_ours, PROMPT, 253, eos_token_id=[]).shape == (1, 256)


# The real model: prompts and settings that none of the chapter 1 notebooks uses.
EMBEDDED_PROMPTS = [
    "用一句话解释什么是递归。",
    "Write a SQL query that counts the rows of a table named users.",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]


def test_embedded_sampled_with_instruct_defaults_equals_hf(embedded_hf, embedded_tokenizer):
    ids = torch.tensor([chat_ids(embedded_tokenizer, EMBEDDED_PROMPTS[0])])
    settings = dict(
        do_sample=True, temperature=0.9, top_k=30, top_p=0.85, min_p=0.02, repetition_penalty=1.1
    )
    eos, pad = (
        embedded_hf.generation_config.eos_token_id,
        embedded_hf.generation_config.pad_token_id,
    )
    expected = hf_generate(
        embedded_hf, ids, torch.ones_like(ids), 10, seed=123, eos=eos, pad=pad, **settings
    )
    assert torch.equal(minqwen.generate(embedded_hf, ids, 10, seed=123, **settings), expected)


def test_embedded_minqwen_batch_equals_hf_greedy(embedded_hf, embedded_ours, embedded_tokenizer):
    prompts = [chat_ids(embedded_tokenizer, text) for text in EMBEDDED_PROMPTS]
    eos = embedded_hf.generation_config.eos_token_id
    ids, mask = left_pad(prompts, pad=eos[-1])
    expected = hf_generate(
        embedded_hf, ids, mask, 8, seed=0, eos=eos, pad=eos[0], repetition_penalty=1.2
    )
    ours = minqwen.generate(
        embedded_ours, ids, 8, attention_mask=mask, eos_token_id=eos, repetition_penalty=1.2
    )
    assert torch.equal(ours, expected)
