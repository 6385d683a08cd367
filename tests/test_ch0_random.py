"""`random:<size>`: the real Qwen2.5 config of a size with random bf16 weights, for GPU smoke runs and benchmarks.

0.5B is written and loaded for real (about 1 GB); every size, 72B included, is checked without writing: its
config loads in HF and minqwen, the tensors the writer would produce are exactly those HF's model has, and the
checkpoint's bytes are the weights of chapter 0's memory estimate.
"""

from __future__ import annotations

import helpers

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import minqwen
from minqwen.model.config import ModelConfig
from minqwen.model.qwen2 import hf_to_minqwen
from minqwen.model.sizes import SIZES, parameter_count, qwen25_config, released_size, tensor_shapes
from minqwen.tools.hardware import memory_estimate

GIB = 1 << 30


@pytest.fixture(scope="module")
def random_05b(tmp_path_factory):
    """random:0.5B written by `fetch` into an empty cache, so the writer runs every time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINQWEN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield minqwen.fetch("random:0.5B")


def test_random_05b_is_a_verified_sharded_checkpoint(random_05b):
    assert random_05b.name == "random-Qwen2.5-0.5B-Instruct"
    assert minqwen.fetch(str(random_05b)) == random_05b  # every file matches SHA256SUMS
    index = json.loads((random_05b / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensor_shapes(qwen25_config("0.5B")))
    assert index["metadata"]["total_size"] == memory_estimate("0.5B", "bfloat16")["weights"]
    for shard in set(index["weight_map"].values()):
        with safe_open(random_05b / shard, framework="pt") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


def test_random_05b_config_round_trips(random_05b):
    written = json.loads((random_05b / "config.json").read_text())
    assert written == json.loads(json.dumps(qwen25_config("0.5B")))
    hf = AutoConfig.from_pretrained(random_05b)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(hf, key) == written[key], key
    assert hf.rope_parameters["rope_theta"] == written["rope_theta"] == 1e6
    ours = ModelConfig.from_file(random_05b)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.head_dim, ours.kv_groups) == (
        896,
        24,
        64,
        7,
    )
    assert ours.tie_word_embeddings and ours.rope_theta == 1e6


def test_random_05b_carries_the_real_tokenizer(random_05b):
    tokenizer = AutoTokenizer.from_pretrained(random_05b)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert tokenizer.decode(tokenizer("你好")["input_ids"]) == "你好"


def test_random_05b_hf_and_minqwen_agree_in_float32(random_05b):
    """Both load the bf16 file upcast to float32 and give the same shapes and the same logits."""
    hf = AutoModelForCausalLM.from_pretrained(random_05b, dtype=torch.float32).eval()
    ours = minqwen.Qwen2.from_pretrained(random_05b, dtype=torch.float32)
    hf_state = dict(hf.named_parameters())
    ours_state = dict(ours.named_parameters())
    assert {hf_to_minqwen(name): tuple(p.shape) for name, p in hf_state.items()} == {
        name: tuple(p.shape) for name, p in ours_state.items()
    }
    assert torch.equal(hf_state["model.embed_tokens.weight"], ours_state["embed_tokens.weight"])
    input_ids = torch.tensor([[151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        expected = hf(input_ids).logits
        actual = ours(input_ids)
    relative = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert relative <= 1e-5, f"max |Δlogits| / max |logits| = {relative:.2e}"


@pytest.mark.parametrize("size", SIZES)
def test_every_size_writes_the_tensors_hf_expects(size):
    """The writer's tensor list equals the parameters of HF's model built (on the meta device) from the config."""
    config = qwen25_config(size)
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(Qwen2Config(**config))
    assert {name: tuple(p.shape) for name, p in hf.named_parameters()} == tensor_shapes(config)
    ModelConfig.from_dict(config, source=f"random:{size}")


@pytest.mark.parametrize("size", SIZES)
def test_every_size_checkpoint_bytes_are_the_estimated_weights(size):
    checkpoint_bytes = sum(
        torch.Size(shape).numel() * 2 for shape in tensor_shapes(qwen25_config(size)).values()
    )
    estimate = memory_estimate(size, "bfloat16")
    assert checkpoint_bytes == estimate["weights"] == parameter_count(size) * 2
    assert estimate["total"] > estimate["weights"] + estimate["kv_cache"]


def test_72b_estimate_needs_more_than_one_80gb_card():
    estimate = memory_estimate("72B", "bfloat16")
    assert round(estimate["weights"] / 1e9) == 145
    assert estimate["total"] > 80 * GIB


@pytest.mark.parametrize(
    "size, fits",
    [("0.5B", True), ("7B", True), ("32B", True), ("72B", False)],
)
def test_hf_reference_spreads_over_devices_only_when_one_80gb_card_cannot_hold_it(
    tmp_path, monkeypatch, size, fits
):
    """helpers.hf_model() loads with device_map="auto" exactly when chapter 0's advice says one card is too small."""
    monkeypatch.setattr(helpers, "DTYPE", torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(qwen25_config(size)))
    assert helpers.fits_one_device(tmp_path, 80 * GIB) is fits


def test_a_model_of_no_released_shape_is_judged_by_its_weights(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(helpers, "DTYPE", torch.float32)
    weight_bytes = sum(f.stat().st_size for f in tiny_checkpoint.glob("*.safetensors"))
    assert helpers.fits_one_device(tiny_checkpoint, weight_bytes * 2)
    assert not helpers.fits_one_device(tiny_checkpoint, weight_bytes // 2)


def test_released_size_names_each_shape_and_nothing_else(tiny_checkpoint):
    assert [released_size(qwen25_config(size)) for size in SIZES] == list(SIZES)
    assert released_size(json.loads((tiny_checkpoint / "config.json").read_text())) is None


def _helpers_settings(**env) -> subprocess.CompletedProcess:
    code = "import helpers; print(helpers.DEVICE, helpers.DTYPE)"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MINQWEN_")} | env
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300
    )


def test_the_notebooks_dtype_follows_the_device_unless_set():
    assert _helpers_settings().stdout.split() == ["cpu", "torch.float32"]
    assert _helpers_settings(MINQWEN_DTYPE="bfloat16").stdout.split() == ["cpu", "torch.bfloat16"]
    if (
        not torch.cuda.is_available()
    ):  # no GPU: cuda falls back to the CPU, and so does its default dtype
        assert _helpers_settings(MINQWEN_DEVICE="cuda").stdout.split() == ["cpu", "torch.float32"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MINQWEN_DTYPE": "fp16"}, "MINQWEN_DTYPE='fp16': use float32 or bfloat16"),
        ({"MINQWEN_DEVICE": "tpu"}, "MINQWEN_DEVICE='tpu': use cpu, cuda or cuda:<index>"),
    ],
)
def test_bad_notebook_settings_get_one_clear_error(env, message):
    done = _helpers_settings(**env)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == f"ValueError: {message}"


def test_a_greedy_split_is_accepted_only_at_a_near_tie_and_only_below_float32(
    tiny_ours, monkeypatch
):
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        logits = tiny_ours(prompt)[0, -1]
    order = logits.argsort(descending=True).tolist()
    gaps = [float(logits[a] - logits[b]) for a, b in zip(order, order[1:])]
    close = gaps.index(min(gaps))
    tied_a, tied_b = order[close], order[close + 1]  # the two tokens whose logits are nearest
    assert min(gaps) <= 1e-2 * float(logits.abs().max())
    best, worst = order[0], order[-1]
    monkeypatch.setattr(helpers, "DTYPE", torch.float32)
    assert helpers.agree_up_to_a_near_tie(tiny_ours, prompt, [best, 7], [best, 7])
    assert not helpers.agree_up_to_a_near_tie(tiny_ours, prompt, [tied_a], [tied_b])
    assert not helpers.agree_up_to_a_near_tie(tiny_ours, prompt, [best], [best, 7])
    monkeypatch.setattr(helpers, "DTYPE", torch.bfloat16)
    assert helpers.agree_up_to_a_near_tie(tiny_ours, prompt, [tied_a, 1], [tied_b, 2])
    assert not helpers.agree_up_to_a_near_tie(tiny_ours, prompt, [worst], [best])
