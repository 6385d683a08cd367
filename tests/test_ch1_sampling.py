"""Chapter 1: each sampling filter gives transformers' logits processors bit for bit, ties included."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minqwen.engine.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    select_next_token,
    top_k_filter,
    top_p_filter,
)

SHAPES = [(1, 7), (3, 50), (4, 1000)]
QWEN_VOCAB = 151936


def random_logits(seed: int, shape, ties: bool) -> torch.Tensor:
    """Normal logits, or (ties=True) logits drawn from a handful of values so most of them tie."""
    generator = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-3, 4, shape, generator=generator).float() * 0.5
    return torch.randn(shape, generator=generator) * 3


def random_ids(seed: int, batch: int, vocab: int, length: int = 12) -> torch.Tensor:
    return torch.randint(
        0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed + 1000)
    )


CASES = [(seed, shape, ties) for seed in range(4) for shape in SHAPES for ties in (False, True)]
# Qwen's full vocabulary is slow to sort, so it gets one seed per tie setting.
CASES += [(0, (2, QWEN_VOCAB), False), (1, (2, QWEN_VOCAB), True)]


@pytest.mark.parametrize("seed,shape,ties", CASES)
@pytest.mark.parametrize("top_k", [1, 2, 5, 40, 200_000])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_k_equals_hf(seed, shape, ties, top_k, min_keep):
    logits, ids = random_logits(seed, shape, ties), random_ids(seed, shape[0], shape[1])
    expected = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(ids, logits.clone())
    assert torch.equal(top_k_filter(logits, top_k, min_tokens_to_keep=min_keep), expected)


@pytest.mark.parametrize("seed,shape,ties", CASES)
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_p_equals_hf(seed, shape, ties, top_p, min_keep):
    logits, ids = random_logits(seed, shape, ties), random_ids(seed, shape[0], shape[1])
    expected = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(ids, logits.clone())
    assert torch.equal(top_p_filter(logits, top_p, min_tokens_to_keep=min_keep), expected)


@pytest.mark.parametrize("seed,shape,ties", CASES)
@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_min_p_equals_hf(seed, shape, ties, min_p, min_keep):
    logits, ids = random_logits(seed, shape, ties), random_ids(seed, shape[0], shape[1])
    expected = MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep)(ids, logits.clone())
    assert torch.equal(min_p_filter(logits, min_p, min_tokens_to_keep=min_keep), expected)


@pytest.mark.parametrize("seed,shape,ties", CASES)
@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 1.7])
def test_temperature_equals_hf(seed, shape, ties, temperature):
    logits, ids = random_logits(seed, shape, ties), random_ids(seed, shape[0], shape[1])
    expected = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    assert torch.equal(apply_temperature(logits, temperature), expected)


@pytest.mark.parametrize("seed,shape,ties", CASES)
@pytest.mark.parametrize("penalty", [0.5, 1.05, 1.3, 2.0])
def test_repetition_penalty_equals_hf(seed, shape, ties, penalty):
    logits, ids = random_logits(seed, shape, ties), random_ids(seed, shape[0], shape[1])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, ids, penalty), expected)


@pytest.mark.parametrize("seed", range(4))
def test_repetition_penalty_skips_left_padding_like_hf(seed):
    logits, ids = random_logits(seed, (3, 40), False), random_ids(seed, 3, 40)
    padding = torch.tensor([0, 4, 9])
    expected = RepetitionPenaltyLogitsProcessor(1.4, prompt_ignore_length=padding)(
        ids, logits.clone()
    )
    ours = apply_repetition_penalty(logits, ids, 1.4, ignore_before=padding)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, apply_repetition_penalty(logits, ids, 1.4))


def test_repetition_penalty_touches_each_seen_token_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    ours = apply_repetition_penalty(logits, torch.tensor([[0, 0, 1, 0]]), 2.0)
    assert ours.tolist() == [[1.0, -4.0, 1.0, 4.0]]


def hf_chain(config: SamplingConfig, ids, logits):
    """The processors generate() builds for these settings, in its order."""
    out = RepetitionPenaltyLogitsProcessor(config.repetition_penalty)(ids, logits.clone())
    if config.greedy:
        return out
    for processor in (
        TemperatureLogitsWarper(float(config.temperature)),
        TopKLogitsWarper(config.top_k) if config.top_k else None,
        TopPLogitsWarper(config.top_p) if config.top_p < 1 else None,
        MinPLogitsWarper(config.min_p),
    ):
        if processor is not None:
            out = processor(ids, out)
    return out


COMBINATIONS = [
    SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    SamplingConfig(do_sample=True, temperature=1.2, top_k=0, top_p=0.9, min_p=0.05),
    SamplingConfig(
        do_sample=True, temperature=0.5, top_k=3, top_p=0.5, min_p=0.2, repetition_penalty=1.5
    ),
    SamplingConfig(do_sample=False, temperature=0.3, top_k=2, repetition_penalty=1.2),
]


@pytest.mark.parametrize("config", COMBINATIONS)
@pytest.mark.parametrize("seed,shape,ties", CASES[::3])
def test_combined_chain_equals_hf(config, seed, shape, ties):
    logits, ids = random_logits(seed, shape, ties), random_ids(seed, shape[0], shape[1])
    assert torch.equal(process_logits(logits, ids, config), hf_chain(config, ids, logits))


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, True, True, False]]


def test_top_k_larger_than_vocab_keeps_everything():
    logits = torch.randn(2, 10)
    assert torch.equal(top_k_filter(logits, 1_000), logits)


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[True, False, False]]


def test_filters_do_not_modify_their_input():
    logits = torch.randn(2, 30)
    before = logits.clone()
    for filtered in (top_k_filter(logits, 3), top_p_filter(logits, 0.5), min_p_filter(logits, 0.3)):
        assert torch.isinf(filtered).any()
    apply_repetition_penalty(logits, torch.tensor([[1, 2], [3, 4]]), 1.3)
    assert torch.equal(logits, before)


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    scores = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    assert select_next_token(scores, SamplingConfig()).tolist() == [1, 0]
    assert SamplingConfig(do_sample=True, temperature=0).greedy


def test_sampling_draws_one_multinomial_on_the_global_rng():
    scores = torch.randn(3, 100)
    config = SamplingConfig(do_sample=True)
    torch.manual_seed(5)
    ours = select_next_token(scores, config)
    torch.manual_seed(5)
    expected = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.5), "top_k must be an int >= 0"),
        (dict(min_p=-0.01), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.01), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(do_sample=True, **settings)
