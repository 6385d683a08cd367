"""Chapter 7: speculative decoding. Greedy output is the target's own, token for token; sampled output has the
target's distribution (a chi-square test that also catches a broken rule); rejected drafts leave the cache; bad
input gets one clear error before any forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_prompts
from test_ch4_cli import assert_one_line_error, exit_code, piped

import minqwen
from minqwen.__main__ import main
from minqwen.engine import speculative
from minqwen.engine.sampling import SamplingConfig
from minqwen.engine.speculative import (
    CachedModel,
    PromptLookup,
    SpeculativeDecoder,
    accept_or_resample,
    speculative_generate,
)
from minqwen.model.cache import DynamicKVCache, StaticKVCache
from minqwen.tools.acceptance import draft_hits, replay_rounds
from minqwen.tools.stats import chi_square


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    return minqwen.Qwen2.from_pretrained(
        make_tiny_checkpoint(tmp_path_factory.mktemp("draft"), seed=5)
    )


def repeating_prompts():
    """Prompts whose second half repeats their first, so prompt lookup finds matches."""
    return [p + p[: len(p) // 2] for p in random_prompts(3, [4, 12, 30])]


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("drafter", ["other", "same", "prompt-lookup"])
def test_greedy_equals_the_targets_own(tiny_ours, tiny_draft, drafter, k):
    draft = {"other": tiny_draft, "same": tiny_ours, "prompt-lookup": "prompt-lookup"}[drafter]
    for prompt in repeating_prompts():
        ids = torch.tensor([prompt])
        expected = minqwen.generate(tiny_ours, ids, 40, do_sample=False)
        got, stats = speculative_generate(
            tiny_ours, draft, ids, 40, num_draft_tokens=k, do_sample=False, return_stats=True
        )
        assert torch.equal(got, expected)
        assert stats.new_tokens == got.shape[1] - ids.shape[1]
        assert stats.rounds + 1 + stats.accepted == stats.new_tokens
        if drafter == "same":
            assert stats.acceptance_rate == 1.0


def test_greedy_with_penalty_and_end_tokens(tiny_instruct_ours, tiny_draft):
    """The Instruct-style defaults: repetition penalty 1.05 (which reads the drafts too) and two end tokens."""
    for prompt in repeating_prompts():
        ids = torch.tensor([prompt])
        expected = minqwen.generate(tiny_instruct_ours, ids, 60, do_sample=False)
        for draft in (tiny_draft, "prompt-lookup", tiny_instruct_ours):
            got = speculative_generate(
                tiny_instruct_ours, draft, ids, 60, num_draft_tokens=4, do_sample=False
            )
            assert torch.equal(got, expected)


def test_length_limits(tiny_ours):
    ids = torch.tensor([random_prompts(1, [6])[0]])
    for n in (0, 1, 2, 7):
        got = speculative_generate(
            tiny_ours, tiny_ours, ids, n, num_draft_tokens=8, do_sample=False
        )
        assert torch.equal(got, minqwen.generate(tiny_ours, ids, n, do_sample=False))


def test_stream_and_tokens(tiny_checkpoint_with_tokenizer):
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint_with_tokenizer)
    tokenizer = minqwen.BPETokenizer.from_file(tiny_checkpoint_with_tokenizer)
    decoder = SpeculativeDecoder(model, "prompt-lookup", num_draft_tokens=3)
    prompt = "def f(x):\n    return x + 1\n\ndef f(x):\n    return"
    plain = minqwen.stream(model, tokenizer, prompt, 24, do_sample=False)
    spec = minqwen.stream(decoder, tokenizer, prompt, 24, do_sample=False)
    assert "".join(spec) == "".join(plain)
    assert spec.token_ids == plain.token_ids and decoder.stats.new_tokens == len(spec.token_ids)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_rollback_forgets_rejected_positions(tiny_ours, cache_kind):
    """Extend with wrong tokens, roll back, extend with the right ones: the logits of an unbroken run."""
    prompt, wrong, right = random_prompts(2, [9, 4, 5])
    straight = CachedModel(tiny_ours)
    expected = straight.extend(prompt + right)[len(prompt) :]
    model = CachedModel(tiny_ours)
    if cache_kind == "static":
        model.cache = StaticKVCache.for_model(tiny_ours, 1, 64)
    model.extend(prompt)
    model.extend(wrong)
    model.rollback(len(prompt))
    assert model.length == len(prompt)
    torch.testing.assert_close(model.extend(right), expected, rtol=1e-5, atol=1e-5)


def test_crop_refuses_a_length_past_the_end():
    cache = DynamicKVCache(2)
    with pytest.raises(ValueError, match="cannot crop a cache of 0 positions to 3"):
        cache.crop(3)


def target_and_draft_distributions(model, draft):
    """p and q after the same context, with the Instruct-style filters: different, both with zeros."""
    sampling = SamplingConfig(do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    context = random_prompts(4, [10])[0]
    p = speculative._probabilities(CachedModel(model).extend(context)[-1], context, sampling)
    q = speculative._probabilities(CachedModel(draft).extend(context)[-1], context, sampling)
    return p, q


def draws(p, q, n: int, proposal=None):
    """n tokens out of the rule: a draft drawn from q (or always `proposal`), then accepted or replaced."""
    torch.manual_seed(0)
    counts = torch.zeros_like(p)
    for _ in range(n):
        token = proposal if proposal is not None else int(torch.multinomial(q, 1))
        replacement = accept_or_resample(p, q, token)
        counts[token if replacement is None else replacement] += 1
    return counts


def test_sampling_rule_keeps_the_targets_distribution(tiny_ours, tiny_draft, monkeypatch):
    p, q = target_and_draft_distributions(tiny_ours, tiny_draft)
    assert 0.5 * (p - q).abs().sum() > 0.3  # far apart, so a broken rule shows
    counts = draws(p, q, 20_000)
    assert chi_square(counts, p)[2] > 0.01
    monkeypatch.setattr(
        speculative, "residual", lambda p, q: p
    )  # resample from p: skips the residual
    broken = draws(p, q, 20_000)
    assert chi_square(broken, p)[2] < 1e-6


def test_sampling_rule_with_a_copied_draft(tiny_ours, tiny_draft):
    """Prompt lookup's q is a point mass on its token: accepted with probability p(token)."""
    p, _ = target_and_draft_distributions(tiny_ours, tiny_draft)
    token = int(p.argmax())
    point = torch.zeros_like(p)
    point[token] = 1
    assert chi_square(draws(p, point, 20_000, proposal=token), p)[2] > 0.01


def test_seeded_sampling_repeats_and_accepts_its_own_draft(tiny_instruct_ours):
    ids = torch.tensor([random_prompts(5, [8])[0]])
    runs = [
        speculative_generate(
            tiny_instruct_ours, tiny_instruct_ours, ids, 30, seed=7, return_stats=True
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].acceptance_rate > 0.95  # p = q up to rounding: nearly every draft stands


def test_replayed_rounds_equal_the_real_ones(tiny_instruct_ours, tiny_draft):
    sampling = SamplingConfig.resolve(tiny_instruct_ours.config.sampling_defaults, do_sample=False)
    for prompt in repeating_prompts():
        ids = torch.tensor([prompt])
        for k in (1, 3, 6):
            for draft in (tiny_draft, PromptLookup()):
                out, stats = speculative_generate(
                    tiny_instruct_ours,
                    draft,
                    ids,
                    50,
                    num_draft_tokens=k,
                    do_sample=False,
                    return_stats=True,
                )
                tokens = out[0].tolist()
                if isinstance(draft, PromptLookup):
                    replayed = replay_rounds(
                        tokens, len(prompt), 50, k, lookup=draft, eos_ids=(7, 2)
                    )
                else:
                    hits = draft_hits(draft, tokens, len(prompt), sampling)
                    replayed = replay_rounds(tokens, len(prompt), 50, k, hits=hits)
                assert (replayed.rounds, replayed.accepted) == (stats.rounds, stats.accepted)


def test_drafts_stop_at_an_end_token():
    assert speculative.until_end([5, 7, 9, 2, 4], eos_ids=(2, 7)) == [5, 7]
    assert speculative.until_end([5, 9], eos_ids=(2,)) == [5, 9]


def test_residual_of_equal_distributions_is_finite():
    """Rounding can leave no excess of p over q; the redraw then falls back to p instead of NaN."""
    p = torch.tensor([0.5, 0.5])
    assert torch.equal(speculative.residual(p, p), p)


def test_prompt_lookup_proposes_what_followed():
    lookup = PromptLookup(max_ngram=2)
    assert lookup.propose([5, 6, 7, 8, 9, 6, 7], 3) == [8, 9, 6]
    assert lookup.propose([5, 6, 7, 8, 9, 1, 7], 2) == [
        8,
        9,
    ]  # the 2-gram fails, the 1-gram [7] matches
    assert lookup.propose([1, 2, 3], 4) == []


def test_the_embedded_model_with_a_quantized_draft(embedded_ours):
    """Real weights: an int8 copy of the 0.5B drafts for the float32 0.5B. They part sometimes, so drafts are
    rejected and rolled back, and the output is still the target's own."""
    draft = minqwen.quantize(copy.deepcopy(embedded_ours), "int8")
    tokenizer = minqwen.BPETokenizer.from_file(minqwen.fetch("embedded"))
    chat = minqwen.render_chat(
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        add_generation_prompt=True,
    )
    ids = torch.tensor([tokenizer.encode(chat)])
    expected = minqwen.generate(embedded_ours, ids, 40, do_sample=False)
    for draft_kind in (draft, "prompt-lookup"):
        got, stats = speculative_generate(
            embedded_ours,
            draft_kind,
            ids,
            40,
            num_draft_tokens=4,
            do_sample=False,
            return_stats=True,
        )
        assert torch.equal(got, expected)
        assert stats.rounds < stats.new_tokens - 1  # some drafts stood


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_draft_tokens=0), "num_draft_tokens must be >= 1, got 0"),
        (dict(num_draft_tokens=2.5), "num_draft_tokens must be an int >= 1, got 2.5"),
        (dict(num_draft_tokens=True), "num_draft_tokens must be an int >= 1, got True"),
        (
            dict(draft="lookup"),
            "draft must be a minqwen Qwen2, a FastQwen2 or 'prompt-lookup', got 'lookup'",
        ),
        (dict(draft=PromptLookup(max_ngram=1, min_ngram=2)), "1 <= min_ngram <= max_ngram"),
        (dict(target="model"), "the target must be a minqwen Qwen2 or FastQwen2, got str"),
    ],
)
def test_bad_arguments(tiny_ours, change, message):
    arguments = dict(target=tiny_ours, draft="prompt-lookup", num_draft_tokens=4) | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SpeculativeDecoder(arguments.pop("target"), arguments.pop("draft"), **arguments)


def test_draft_with_a_larger_vocabulary(tiny_ours, tmp_path):
    from conftest import make_tiny_checkpoint

    bigger = minqwen.Qwen2.from_pretrained(make_tiny_checkpoint(tmp_path / "a", vocab_size=256))
    with pytest.raises(
        ValueError, match=r"vocabulary \(256 ids\) is larger than the target's \(128\)"
    ):
        SpeculativeDecoder(tiny_ours, bigger)


def test_draft_on_another_device(tiny_ours, tiny_draft):
    elsewhere = copy.deepcopy(tiny_draft).to("meta")
    with pytest.raises(
        ValueError, match=r"the draft is on meta and the target on cpu; .*draft.to\('cpu'\)"
    ):
        SpeculativeDecoder(tiny_ours, elsewhere)


def test_batches_and_padding_are_refused(tiny_ours):
    decoder = SpeculativeDecoder(tiny_ours, "prompt-lookup")
    with pytest.raises(ValueError, match="takes one prompt \\(batch 1\\), got 2"):
        decoder.generate(torch.tensor([[3, 4], [5, 6]]), 4)
    with pytest.raises(ValueError, match="left-padded"):
        decoder.generate(torch.tensor([[0, 4]]), 4, attention_mask=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        decoder.generate(torch.tensor([[3, 4]]), -1)


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--num-draft-tokens", "3"], ["--num-draft-tokens goes with --draft"]),
        (
            ["--draft", "prompt-lookup", "--num-draft-tokens", "0"],
            ["--num-draft-tokens must be at least 1"],
        ),
        (["--draft", "prompt-lookup", "--engine", "fast"], ["--draft runs on the eager engine"]),
        (["--draft", "embedded", "--quantize", "int8"], ["--quantize applies to the target only"]),
        (["--draft", "no-such-model"], ["unknown model source 'no-such-model'"]),
    ],
)
def test_cli_bad_draft_flags(capsys, flags, fragments):
    assert exit_code(["generate", "hi", *flags]) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_draft_prints_what_the_target_prints_and_the_acceptance(
    tiny_checkpoint_with_tokenizer, capsys, monkeypatch, command
):
    prompt = "def f(x):\n    return x + 1\n\ndef f(x):"
    args = [
        command,
        "--model",
        str(tiny_checkpoint_with_tokenizer),
        "--max-new-tokens",
        "16",
        "--greedy",
    ]
    if command == "generate":
        args.insert(1, prompt)
    outputs = []
    for extra in ([], ["--draft", "prompt-lookup", "--num-draft-tokens", "3", "--stats"]):
        monkeypatch.setattr("sys.stdin", piped(prompt.replace("\n", " ") + "\n"))
        assert main([*args, *extra]) == 0
        outputs.append(capsys.readouterr())
    assert outputs[0].out == outputs[1].out and outputs[0].out.strip()
    assert "tokens per target pass" in outputs[1].err and "drafts accepted" in outputs[1].err


@pytest.mark.parametrize("drafter", ["same model", "other model", "prompt-lookup"])
def test_fast_engine_target_and_draft(tiny_instruct_ours, tiny_draft, drafter):
    """The fast engine's spans (eager on the CPU, CUDA graphs on a GPU) verify and draft like the eager model."""
    from minqwen.engine.fast import FastQwen2

    target = FastQwen2(tiny_instruct_ours)
    draft = {
        "same model": FastQwen2(tiny_instruct_ours),  # nearly always accepted
        "other model": FastQwen2(tiny_draft),  # nearly always rejected
        "prompt-lookup": "prompt-lookup",
    }[drafter]
    for prompt in repeating_prompts():
        ids = torch.tensor([prompt])
        expected = minqwen.generate(tiny_instruct_ours, ids, 50, do_sample=False)
        for k in (1, 4):
            got, stats = speculative_generate(
                target, draft, ids, 50, num_draft_tokens=k, do_sample=False, return_stats=True
            )
            assert torch.equal(got, expected)
    assert stats.accepted > 0 or drafter == "other model"


def test_fast_engine_cannot_draft_for_itself(tiny_ours):
    from minqwen.engine.fast import FastQwen2

    fast = FastQwen2(tiny_ours)
    with pytest.raises(ValueError, match="second FastQwen2 for the draft"):
        SpeculativeDecoder(fast, fast)
