"""Chapter 4: minqwen-fast picks exactly the greedy tokens of minqwen-eager in float32 on a CPU.

The GPU half of the story (CUDA graphs, bf16) is checked on the device machine by scripts/gpu_fast_check.py;
its results are committed under book/data/bench/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minqwen
from minqwen.fast import FastQwen2, greedy_agreement

GOLDEN = Path(__file__).resolve().parents[1] / "book" / "data" / "golden"
PROMPTS = [  # used when no golden file has been recorded yet
    "Write a Python function that returns the nth Fibonacci number.",
    "What is a KV cache?",
]


@pytest.fixture(scope="module")
def fast_tiny(tiny_ours):
    return FastQwen2(tiny_ours, bucket=16)


def random_prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=generator)


@pytest.mark.parametrize("batch,length,new", [(1, 5, 30), (3, 11, 20), (2, 1, 40)])
def test_greedy_tokens_equal_eager(tiny_ours, fast_tiny, batch, length, new):
    ids = random_prompts(batch, length, seed=batch * 31 + length)
    eager = minqwen.generate(tiny_ours, ids, new, eos_token_id=[])
    assert torch.equal(fast_tiny.generate(ids, new, eos_token_id=[]), eager)


def test_left_padded_batch_equals_eager(tiny_ours, fast_tiny):
    ids = random_prompts(3, 12, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    eager = minqwen.generate(tiny_ours, ids, 25, attention_mask=mask, eos_token_id=[])
    assert torch.equal(fast_tiny.generate(ids, 25, attention_mask=mask, eos_token_id=[]), eager)


def test_end_tokens_pad_and_stop_like_eager(tiny_ours, fast_tiny):
    ids = random_prompts(2, 6, seed=3)
    free = minqwen.generate(tiny_ours, ids, 30, eos_token_id=[])
    # End on tokens the model does produce, so rows finish at different steps and the run stops early.
    ends = [int(free[0, 6 + 4]), int(free[1, 6 + 9])]
    eager = minqwen.generate(tiny_ours, ids, 30, eos_token_id=ends)
    fast = fast_tiny.generate(ids, 30, eos_token_id=ends)
    assert eager.shape[1] < ids.shape[1] + 30, (
        "the chosen end tokens should stop the eager loop early"
    )
    assert torch.equal(fast, eager)


def test_prompts_in_one_bucket_share_one_state(tiny_ours):
    fast = FastQwen2(tiny_ours, bucket=64)
    fast.generate(random_prompts(1, 5), 10, eos_token_id=[])
    state = fast._state
    fast.generate(random_prompts(1, 40, seed=1), 20, eos_token_id=[])
    assert fast._state is state, "5 + 10 and 40 + 20 tokens both fit one 64-position bucket"
    fast.generate(random_prompts(1, 60, seed=2), 20, eos_token_id=[])
    assert fast._state is not state and fast._state.generated.shape == (1, 128)


def test_agreement_report_on_equal_paths(tiny_ours, fast_tiny):
    rows = greedy_agreement(tiny_ours, fast_tiny, random_prompts(2, 7, seed=5), 12)
    assert [r["same"] for r in rows] == [12, 12]
    assert all("gap" not in r for r in rows)


def test_agreement_reports_a_rounding_level_gap_in_bf16(tiny_checkpoint):
    model = minqwen.Qwen2.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    rows = greedy_agreement(model, FastQwen2(model, bucket=16), random_prompts(3, 11, seed=0), 32)
    parted = [r for r in rows if r["same"] < 32]
    for r in (
        parted
    ):  # where bf16 paths part, the two choices are a few rounding steps apart, not a real gap
        assert abs(r["gap_ulps"]) <= 8, r


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
        fast_tiny.generate(random_prompts(1, 250), 10)


def _prompts() -> list[str]:
    golden = [json.loads(p.read_text()) for p in sorted(GOLDEN.glob("*.json"))]
    return [g["prompt"] for g in golden if isinstance(g.get("prompt"), str)] or PROMPTS


def test_embedded_model_first_tokens_equal_eager(embedded_ours, embedded_tokenizer):
    texts = [
        embedded_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in _prompts()
    ]
    embedded_tokenizer.padding_side = "left"
    batch = embedded_tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eager = minqwen.generate(embedded_ours, ids, 6, attention_mask=mask)
    fast = FastQwen2(embedded_ours).generate(ids, 6, attention_mask=mask)
    assert torch.equal(fast, eager)
