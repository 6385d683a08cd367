"""Chapter 4: batching. Prompts of different lengths, left-padded, generate what each would generate alone."""

import pytest
import torch
from conftest import hf_generate, left_pad

from minqwen.engine.generate import generate
from minqwen.model.qwen2 import positions_from_mask
from minqwen.tools.hf_adapter import HFAdapter

PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [100], list(range(3, 30)), [64, 64, 64]]
PAD = 0


def test_positions_count_real_tokens_only():
    _, mask = left_pad([[7, 8, 9], [5]])
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_last_logits_of_a_padded_batch_equal_each_prompt_alone(tiny_ours):
    ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        batched = tiny_ours(ids, attention_mask=mask)[:, -1]
        alone = torch.cat([tiny_ours(torch.tensor([p]))[:, -1] for p in PROMPTS])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def strip(row: torch.Tensor, width: int, eos: int) -> list[int]:
    """A batched row's new tokens, cut after its first end token (finished rows are padded after it)."""
    new = row[width:].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("model_name", ["tiny_ours", "tiny_hf"])
def test_batched_greedy_equals_each_prompt_alone(request, model_name, use_cache):
    model = request.getfixturevalue(model_name)
    model = HFAdapter(model) if model_name == "tiny_hf" else model
    ids, mask = left_pad(PROMPTS)
    batched = generate(
        model, ids, 20, attention_mask=mask, use_cache=use_cache, repetition_penalty=1.2
    )
    for row, prompt in zip(batched, PROMPTS):
        alone = generate(
            model, torch.tensor([prompt]), 20, use_cache=use_cache, repetition_penalty=1.2
        )[0]
        assert strip(row, ids.shape[1], eos=2) == alone[len(prompt) :].tolist()


@pytest.mark.parametrize("seed", [0, 5])
def test_batched_sampling_equals_hf_generate_on_the_same_batch(tiny_ours, tiny_hf, seed):
    ids, mask = left_pad(PROMPTS)
    settings = dict(
        do_sample=True, seed=seed, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.1
    )
    ours = generate(tiny_ours, ids, 16, attention_mask=mask, **settings)
    reference = hf_generate(tiny_hf, ids, 16, mask=mask, **settings)
    assert torch.equal(ours, reference)


def test_a_batch_without_padding_needs_no_mask(tiny_ours):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert torch.equal(
        generate(tiny_ours, ids, 8),
        generate(tiny_ours, ids, 8, attention_mask=torch.ones_like(ids)),
    )


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([[1, 1, 1], [1, 1, 0]]), "right padding"),
        (torch.tensor([[1, 1, 1], [1, 0, 1]]), "right padding"),
        (torch.tensor([[1, 1, 1], [0, 0, 0]]), "all padding"),
        (torch.tensor([[1, 1, 1]]), "attention_mask has shape"),
        (torch.tensor([[1, 1, 1], [0, 2, 1]]), "only 0"),
    ],
)
def test_bad_masks_are_rejected(tiny_ours, mask, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_ours, torch.ones(2, 3, dtype=torch.long), 4, attention_mask=mask)


def test_embedded_batch_equals_each_prompt_alone(embedded_ours, embedded_tokenizer):
    questions = [
        "Hi!",
        "Write one word that rhymes with cat.",
        "用中文说“早上好”，然后解释它的意思。",
    ]
    texts = [
        embedded_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    batch = embedded_tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three different lengths
    width = batch["input_ids"].shape[1]
    batched = generate(
        embedded_ours,
        batch["input_ids"],
        8,
        attention_mask=batch["attention_mask"],
        do_sample=False,
    )
    for row, text in zip(batched, texts):
        alone = embedded_tokenizer(text, return_tensors="pt")["input_ids"]
        single = generate(embedded_ours, alone, 8, do_sample=False)[0, alone.shape[1] :].tolist()
        assert strip(row, width, eos=151645) == single
