"""Chapter 0: the hardware report and the memory model behind the size advice."""

import pytest
import torch

from minqwen.model.sizes import SIZES, kv_cache_bytes_per_token, parameter_count, qwen25_config
from minqwen.tools.hardware import hardware_report, memory_estimate, recommend_size

GIB = 1 << 30


def test_report_fields():
    report = hardware_report()
    assert report.cpu_cores >= 1 and report.ram_total_bytes >= report.ram_available_bytes > 0
    assert report.torch == torch.__version__
    assert (report.gpu is None) == (not torch.cuda.is_available())


@pytest.mark.parametrize("size, billions", [("0.5B", 0.494), ("1.5B", 1.544), ("7B", 7.616)])
def test_parameter_counts_match_published_totals(size, billions):
    assert round(parameter_count(size) / 1e9, 3) == billions


@pytest.mark.parametrize("size", ["0.5B", "1.5B", "7B"])
def test_parameter_count_equals_hf_model_built_from_the_config(size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**qwen25_config(size))
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == parameter_count(size)


def test_kv_cache_bytes_per_token():
    assert kv_cache_bytes_per_token("0.5B") == 2 * 24 * 2 * 64 * 2
    assert kv_cache_bytes_per_token("7B", "float32") == 2 * 28 * 4 * 128 * 4


def test_estimate_grows_with_context_batch_and_precision():
    base = memory_estimate("7B")
    assert memory_estimate("7B", context=8192)["kv_cache"] == 2 * base["kv_cache"]
    assert memory_estimate("7B", batch=4)["kv_cache"] == 4 * base["kv_cache"]
    assert memory_estimate("7B", "float32")["weights"] == 2 * base["weights"]
    assert base["total"] == base["weights"] + base["kv_cache"] + base["activations"]


def test_recommendation_is_monotone_in_memory():
    picks = [recommend_size(g * GIB) for g in (1, 4, 16, 24, 40, 80, 200)]
    order = [None, *SIZES]
    assert [order.index(p) for p in picks] == sorted(order.index(p) for p in picks)
    assert recommend_size(0) is None and recommend_size(200 * GIB) == "72B"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "int3"}, r"unknown dtype 'int3'; choose one of float32"),
        ({"context": 0}, r"context and batch must be positive"),
    ],
)
def test_bad_estimate_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory_estimate("0.5B", **kwargs)


def test_unknown_size():
    with pytest.raises(ValueError, match=r"unknown Qwen2.5 size '2B'"):
        memory_estimate("2B")
