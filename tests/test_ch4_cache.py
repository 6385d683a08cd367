"""Chapter 4: the KV cache. Cached logits equal uncached ones, and cached, uncached and HF generate() agree."""

import pytest
import torch
from conftest import hf_generate, make_tiny_checkpoint
from transformers import Qwen2ForCausalLM

import minqwen
from minqwen import DynamicKVCache, StaticKVCache
from minqwen.engine.generate import generate
from minqwen.tools.hf_adapter import HFAdapter

# Shapes beyond the book's: multi-query attention, tied head, many groups, a long-context rope base.
VARIANTS = {
    "gqa": {},
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "mha_3_layers": dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3),
    "8_groups_theta_1e6": dict(
        num_attention_heads=8, num_key_value_heads=1, hidden_size=128, rope_theta=1e6
    ),
}
PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [100], list(range(3, 60))]
SAMPLING = [
    dict(do_sample=False),
    dict(do_sample=True, seed=7, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    dict(do_sample=True, seed=1, temperature=1.5, min_p=0.05),
]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param), seed=1, **VARIANTS[request.param]
    )
    hf = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return minqwen.Qwen2.from_pretrained(folder), hf


def make_cache(kind, model, batch, max_len):
    if kind == "dynamic":
        return DynamicKVCache(model.config.num_hidden_layers)
    return StaticKVCache.for_model(model, batch, max_len)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_step_by_step_logits_equal_the_uncached_forward(tiny_ours, kind):
    ids = torch.tensor([[3, 9, 27, 81, 1, 5, 44, 90, 12, 6, 7, 64]])
    with torch.inference_mode():
        full = tiny_ours(ids)
        cache = make_cache(kind, tiny_ours, 1, ids.shape[1])
        steps = [tiny_ours(ids[:, :5], cache=cache)]
        for t in range(5, ids.shape[1]):
            steps.append(tiny_ours(ids[:, t : t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert cache.length == ids.shape[1]


def test_cache_layout_matches_transformers(tiny_ours, tiny_hf):
    ids = torch.tensor([[3, 9, 27, 81, 1], [5, 44, 90, 12, 6]])
    ours = DynamicKVCache(tiny_ours.config.num_hidden_layers)
    with torch.inference_mode():
        tiny_ours(ids, cache=ours)
        theirs = tiny_hf(ids, use_cache=True).past_key_values
    config = tiny_ours.config
    for layer in range(config.num_hidden_layers):
        assert ours.keys[layer].shape == (2, config.num_key_value_heads, 5, config.head_dim)
        torch.testing.assert_close(
            ours.keys[layer], theirs.layers[layer].keys, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            ours.values[layer], theirs.layers[layer].values, rtol=1e-5, atol=1e-6
        )


def test_static_cache_grows_in_place(tiny_ours):
    cache = StaticKVCache.for_model(tiny_ours, batch=1, max_len=8)
    storage = cache.keys.data_ptr()
    with torch.inference_mode():
        tiny_ours(torch.tensor([[1, 2, 3]]), cache=cache)
        tiny_ours(torch.tensor([[4]]), cache=cache)
    assert cache.length == 4 and cache.keys.data_ptr() == storage
    assert cache.keys[:, :, :, 4:].abs().sum() == 0


def test_static_cache_refuses_to_overflow(tiny_ours):
    cache = StaticKVCache.for_model(tiny_ours, batch=1, max_len=4)
    with torch.inference_mode():
        tiny_ours(torch.tensor([[1, 2, 3]]), cache=cache)
        tiny_ours(torch.tensor([[4]]), cache=cache)
        with pytest.raises(ValueError, match="holds 4 positions"):
            tiny_ours(torch.tensor([[5]]), cache=cache)


@pytest.mark.parametrize(
    "settings", SAMPLING, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items())
)
@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
def test_cached_uncached_and_hf_generate_agree(pair, prompt, settings):
    ours, hf = pair
    ids = torch.tensor([prompt])
    reference = hf_generate(hf, ids, 16, **settings)
    seed = settings.get("seed", 0)
    settings = {**settings, "seed": seed}
    assert torch.equal(generate(ours, ids, 16, **settings), reference)
    assert torch.equal(generate(ours, ids, 16, use_cache=False, **settings), reference)
    assert torch.equal(generate(HFAdapter(hf), ids, 16, **settings), reference)


def test_generation_never_stops_early_with_no_end_token(tiny_ours):
    out = generate(tiny_ours, torch.tensor([[5, 6]]), 30, eos_token_id=[], do_sample=True, seed=0)
    assert out.shape == (1, 32)


def test_embedded_cached_uncached_and_hf_agree(embedded_ours, embedded_hf, embedded_tokenizer):
    messages = [{"role": "user", "content": "Name three prime numbers greater than 100."}]
    ids = embedded_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    for settings in (
        dict(do_sample=False),
        dict(
            do_sample=True, seed=11, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
        ),
    ):
        reference = hf_generate(embedded_hf, ids, 10, **settings)
        settings = {**settings, "seed": settings.get("seed", 0)}
        cached = generate(embedded_ours, ids, 10, **settings)
        uncached = generate(embedded_ours, ids, 10, use_cache=False, **settings)
        assert torch.equal(cached, reference) and torch.equal(uncached, reference), settings
