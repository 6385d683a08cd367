"""Chapter 4: minqwen-fast does everything the eager loop does, with the same tokens in float32 on a CPU.

On a CPU the fast engine runs its step eagerly with the eager loop's own processors and draw, so greedy and
sampled tokens must be equal for the same seed. On CUDA it samples with `sample_without_sync` inside a CUDA
graph: that sampler is tested here for its distribution (chi-square), and on the GPU by scripts/gpu_fast_check.py,
whose results are committed under book/data/bench/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import left_pad, random_prompts

import minqwen
from minqwen.engine.fast import MAX_STATES, FastQwen2, greedy_agreement
from minqwen.engine.request import NumericalError
from minqwen.engine.sampling import SamplingConfig, process_logits, sample_without_sync
from minqwen.tools.stats import chi_square

GOLDEN = Path(__file__).resolve().parents[1] / "book" / "data" / "golden"
SETTINGS = {
    "greedy": dict(do_sample=False),
    "greedy, penalty": dict(do_sample=False, repetition_penalty=1.3),
    "sampled": dict(do_sample=True),
    "instruct": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    "min-p, no top-k": dict(do_sample=True, top_k=0, min_p=0.05, temperature=1.2),
}


@pytest.fixture(scope="module")
def fast_tiny(tiny_ours):
    return FastQwen2(tiny_ours, bucket=16)


@pytest.fixture(scope="module")
def fast_instruct(tiny_instruct_ours):
    return FastQwen2(tiny_instruct_ours, bucket=16)


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor(random_prompts(seed, [length] * batch))


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("batch,length,new", [(1, 5, 30), (3, 11, 20), (2, 1, 40)])
def test_tokens_equal_eager(tiny_ours, fast_tiny, name, batch, length, new):
    ids = prompts(batch, length, seed=batch * 31 + length)
    kw = dict(eos_token_id=[], seed=5, **SETTINGS[name])
    eager = minqwen.generate(tiny_ours, ids, new, **kw)
    assert torch.equal(fast_tiny.generate(ids, new, **kw), eager)


@pytest.mark.parametrize("name", SETTINGS)
def test_left_padded_batch_equals_eager(tiny_ours, fast_tiny, name):
    ids, mask = left_pad(random_prompts(7, [7, 12, 10]))
    kw = dict(attention_mask=mask, eos_token_id=[], seed=1, **SETTINGS[name])
    eager = minqwen.generate(tiny_ours, ids, 25, **kw)
    assert torch.equal(fast_tiny.generate(ids, 25, **kw), eager)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_checkpoint_defaults_equal_eager(tiny_instruct_ours, fast_instruct, seed):
    """No settings: sampling, filters, end tokens and pad id all from generation_config.json."""
    ids, mask = left_pad(random_prompts(40 + seed, [5, 9, 3]))
    eager = minqwen.generate(tiny_instruct_ours, ids, 30, attention_mask=mask, seed=seed)
    assert torch.equal(fast_instruct.generate(ids, 30, attention_mask=mask, seed=seed), eager)


@pytest.mark.parametrize("do_sample", [False, True])
def test_rows_finishing_at_different_steps_equal_eager(
    tiny_instruct_ours, fast_instruct, do_sample
):
    """The pad id (0) is not the first end token, so a finished row shows which id the engine pads with."""
    ids, mask = left_pad(random_prompts(3, [6, 6, 4]))
    kw = dict(attention_mask=mask, seed=4, do_sample=do_sample)
    free = minqwen.generate(tiny_instruct_ours, ids, 30, eos_token_id=[], **kw)
    ends = [int(free[0, 6 + 4]), int(free[1, 6 + 9]), int(free[2, 6 + 14])]
    eager = minqwen.generate(tiny_instruct_ours, ids, 30, eos_token_id=ends, **kw)
    fast = fast_instruct.generate(ids, 30, eos_token_id=ends, **kw)
    assert eager.shape[1] < ids.shape[1] + 30, "the chosen end tokens should stop the loop early"
    assert torch.equal(fast, eager)
    row = eager[0, 6:].tolist()
    finished_at = min(row.index(e) for e in ends if e in row)
    assert set(row[finished_at + 1 :]) == {0}, "a finished row is padded with the pad id"


def test_generate_tokens_streams_what_generate_returns(tiny_instruct_ours, fast_instruct):
    ids, mask = left_pad(random_prompts(8, [4, 8]))
    kw = dict(attention_mask=mask, seed=9)
    steps = list(fast_instruct.generate_tokens(ids, 20, **kw))
    whole = fast_instruct.generate(ids, 20, **kw)
    assert torch.equal(torch.stack(steps, dim=1), whole[:, ids.shape[1] :])
    eager_steps = list(minqwen.generate_tokens(tiny_instruct_ours, ids, 20, **kw))
    assert len(steps) == len(eager_steps)


def test_each_shape_keeps_its_state(tiny_ours):
    """Alternating two shapes reuses both states; the least recently used goes past MAX_STATES."""
    fast = FastQwen2(tiny_ours, bucket=64)
    fast.generate(prompts(1, 5), 10)
    fast.generate(prompts(1, 40, seed=1), 20)
    assert list(fast._states) == [(1, 64)], (
        "5 + 10 and 40 + 20 tokens both fit one 64-position bucket"
    )
    first = fast._states[(1, 64)]
    fast.generate(prompts(2, 60, seed=2), 20)
    fast.generate(prompts(1, 5), 10)
    assert fast._states[(1, 64)] is first, "going back to a shape reuses its state"
    for batch in range(3, 3 + MAX_STATES):
        fast.generate(prompts(batch, 5), 4)
    assert len(fast._states) == MAX_STATES and (1, 64) not in fast._states


def test_agreement_report_on_equal_paths(tiny_ours, fast_tiny):
    rows = greedy_agreement(tiny_ours, fast_tiny, prompts(2, 7, seed=5), 12)
    assert [r["same"] for r in rows] == [12, 12]
    assert all("gap" not in r for r in rows)


def test_agreement_reports_a_rounding_level_gap_in_bf16(tiny_checkpoint):
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    rows = greedy_agreement(model, FastQwen2(model, bucket=16), prompts(8, 11, seed=0), 64)
    parted = [r for r in rows if r["same"] < 64]
    assert parted, "bf16 eager and fast paths round differently; some row should part in 64 tokens"
    for r in parted:  # where they part, the two choices are a few rounding steps apart
        assert abs(r["gap_ulps"]) <= 8, r


def test_nan_logits_stop_generation_with_the_step(tiny_checkpoint):
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.norm.weight[3] = float("inf")
    with pytest.raises(NumericalError, match="NaN or infinity at new token 0"):
        FastQwen2(model).generate(prompts(1, 4), 8)


def test_bad_arguments_raise_before_work(tiny_ours, fast_tiny):
    with pytest.raises(ValueError, match="Qwen2"):
        FastQwen2(object())
    with pytest.raises(ValueError, match="bucket"):
        FastQwen2(tiny_ours, bucket=0)
    with pytest.raises(ValueError, match="CUDA"):
        FastQwen2(tiny_ours, use_graphs=True)
    with pytest.raises(ValueError, match="2-D"):
        fast_tiny.generate(torch.tensor([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        fast_tiny.generate(prompts(1, 250), 10)
    with pytest.raises(ValueError, match="top_p"):
        fast_tiny.generate(prompts(1, 5), 4, do_sample=True, top_p=0)
    with pytest.raises(ValueError, match="not a token id"):
        fast_tiny.generate(torch.tensor([[5, 999]]), 4)


SAMPLER_SETTINGS = {
    "temperature only": SamplingConfig(do_sample=True, temperature=0.8),
    "instruct": SamplingConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
    ),
    "top-p alone": SamplingConfig(do_sample=True, top_p=0.9),
    "top-k and min-p": SamplingConfig(do_sample=True, top_k=40, min_p=0.05),
}


def exact_probabilities(logits, seen, sampling) -> torch.Tensor:
    return process_logits(logits, None, sampling, seen=seen).softmax(dim=-1)[0]


@pytest.mark.parametrize("name", SAMPLER_SETTINGS)
def test_sampler_without_sync_draws_the_exact_distribution(name):
    """20,000 draws of the graph-safe sampler against the eager processors' distribution, and a control."""
    sampling = SAMPLER_SETTINGS[name]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=generator) * 3
    seen = torch.zeros(1, 500, dtype=torch.bool)
    seen[0, logits[0].topk(5).indices[1:3]] = True
    draws = 20_000
    torch.manual_seed(1)
    tokens = sample_without_sync(logits.expand(draws, -1), seen.expand(draws, -1), sampling)
    counts = torch.bincount(tokens, minlength=500)
    _, _, p_value = chi_square(counts, exact_probabilities(logits, seen, sampling))
    assert p_value > 0.01, f"{name}: p = {p_value:.3g}"
    wrong = SamplingConfig(**{**vars(sampling), "temperature": sampling.temperature * 1.5})
    _, _, p_control = chi_square(counts, exact_probabilities(logits, seen, wrong))
    assert p_control < 1e-6, f"{name}: the wrong temperature was not rejected (p = {p_control:.3g})"


def test_sampler_without_sync_is_argmax_when_greedy():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    seen = torch.zeros(4, 300, dtype=torch.bool)
    seen[:, :10] = True
    sampling = SamplingConfig(do_sample=False, repetition_penalty=1.3)
    expected = process_logits(logits, None, sampling, seen=seen).argmax(dim=-1)
    assert torch.equal(sample_without_sync(logits, seen, sampling), expected)


def golden_prompts() -> list[list[int]]:
    return [json.loads(path.read_text())["prompt_ids"] for path in sorted(GOLDEN.glob("*.json"))]


def test_golden_prompts_exist():
    """The embedded test below runs on the golden prompts; it must not run on nothing."""
    assert len(golden_prompts()) >= 3


def test_embedded_model_equals_eager_on_golden_prompts(embedded_ours):
    ids, mask = left_pad(golden_prompts(), pad=embedded_ours.config.pad_token_id)
    fast = FastQwen2(embedded_ours)
    for kw in (dict(do_sample=False), dict(seed=0)):
        eager = minqwen.generate(embedded_ours, ids, 6, attention_mask=mask, **kw)
        assert torch.equal(fast.generate(ids, 6, attention_mask=mask, **kw), eager), kw
