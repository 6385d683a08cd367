"""Chapter 4: the benchmark's plan, roofline arithmetic, timing method and output records (CPU, tiny models).

No test asserts a speed: timings vary by machine. They assert the method and the records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minqwen.model.config import ModelConfig
from minqwen.model.sizes import parameter_count, prefill_flops, qwen25_config, weight_bytes_per_step
from minqwen.tools import bench


def config(size: str) -> ModelConfig:
    return ModelConfig.from_dict(qwen25_config(size))


def test_plan_is_the_cross_product_minus_skips():
    cells = bench.plan(
        ["0.5B", "7B"], ["hf-eager", "minqwen-fast"], [1, 4], [128, 2048], skip=["7B/hf-eager/4/*"]
    )
    assert len(cells) == 2 * 2 * 2 * 2 - 2
    assert bench.Cell("7B", "hf-eager", 4, 128) not in cells
    assert cells[0] == bench.Cell("0.5B", "hf-eager", 1, 128)


@pytest.mark.parametrize(
    "args, message",
    [
        ((["0.5B"], ["hf-fast"], [1], [128]), "unknown implementation"),
        ((["0.5B"], ["hf-eager"], [0], [128]), "positive"),
        ((["0.5B"], ["hf-eager"], [1], [True]), "positive"),
    ],
)
def test_plan_rejects_bad_cells(args, message):
    with pytest.raises(ValueError, match=message):
        bench.plan(*args)


@pytest.mark.parametrize(
    "installed, models, batches, message",
    [
        (False, ["embedded"], [1], "needs llama-cpp-python: run `make llamacpp` first"),
        (True, ["0.5B"], [1], "llamacpp runs an embedded model's own GGUF file"),
        (True, ["embedded"], [1, 4], "use --batches 1"),
    ],
)
def test_llamacpp_is_checked_before_anything_runs(monkeypatch, installed, models, batches, message):
    spec = object() if installed else None
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ValueError, match=message):
        bench.plan(models, ["minqwen-eager", "llamacpp"], batches, [32])


@pytest.mark.parametrize("size", ["0.5B", "1.5B", "7B"])
def test_weight_bytes_count_every_parameter_but_an_untied_embedding(size):
    c = qwen25_config(size)
    embedding = c["vocab_size"] * c["hidden_size"]
    read = parameter_count(size) - (0 if c["tie_word_embeddings"] else embedding)
    assert weight_bytes_per_step(config(size), "bfloat16") == 2 * read


def test_decode_roofline_matches_the_issue_reference():
    # The issue quotes about 3,050 tok/s for 0.5B and 213 for 7B at batch 1 with a 3.0 TB/s copy bandwidth.
    for size, expected in [("0.5B", 3050), ("7B", 213)]:
        tok_s = bench.roofline(config(size), 1, 128, 128, "bfloat16", 3.0e12, 7.9e14)[
            "decode_tok_s"
        ]
        assert abs(tok_s - expected) / expected < 0.03, (size, tok_s)


def test_roofline_grows_with_batch_and_shrinks_with_context():
    c = config("7B")
    one, many = (
        bench.roofline(c, b, 128, 64, "bfloat16", 3e12, 8e14)["decode_tok_s"] for b in (1, 64)
    )
    assert 50 < many / one < 64, "a batch shares the weight reads; only its cache reads grow"
    long = bench.roofline(c, 64, 2048, 64, "bfloat16", 3e12, 8e14)["decode_tok_s"]
    assert long < many


def test_prefill_roofline_is_bound_by_weights_for_short_prompts():
    c = config("7B")
    short = bench.roofline(c, 1, 16, 64, "bfloat16", 3e12, 8e14)["prefill_tok_s"]
    assert short == pytest.approx(16 / (weight_bytes_per_step(c, "bfloat16") / 3e12))
    flops = prefill_flops(c, 1, 2048)
    assert bench.roofline(c, 1, 2048, 64, "bfloat16", 3e12, 8e14)["prefill_tok_s"] == pytest.approx(
        2048 / (flops / 8e14)
    )


def test_measure_separates_prefill_from_decode():
    """A fake generator whose prefill takes 20 ms and each further token 5 ms."""
    import time

    def run(ids, new_tokens):
        time.sleep(0.02 + 0.005 * (new_tokens - 1))
        return torch.zeros(ids.shape[0], ids.shape[1] + new_tokens, dtype=torch.long)

    result = bench.measure(run, torch.zeros(2, 10, dtype=torch.long), 9, repeats=3, warmup=0)
    assert result["prefill_tok_s"] == pytest.approx(2 * 10 / 0.02, rel=0.5)
    assert result["decode_tok_s"] == pytest.approx(2 * 8 / 0.04, rel=0.5)
    assert result["peak_mem_bytes"] is None


def test_measure_rejects_a_short_output():
    with pytest.raises(RuntimeError, match="asked for 1 new tokens, got output"):
        bench.measure(
            lambda ids, n: ids, torch.zeros(1, 3, dtype=torch.long), 4, repeats=1, warmup=0
        )
    with pytest.raises(ValueError, match="at least 2"):
        bench.measure(lambda ids, n: ids, torch.zeros(1, 3, dtype=torch.long), 1)


def test_run_writes_one_record_per_cell_and_roofline(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.jsonl"
    cells = bench.plan(
        [str(tiny_checkpoint)], ["hf-eager", "minqwen-eager", "minqwen-fast"], [1, 2], [6]
    )
    # 32 tokens and medians of 3 keep decoding well above the timing noise of a busy machine.
    records = bench.run_bench(
        cells,
        new_tokens=32,
        repeats=3,
        device="cpu",
        dtype=torch.float32,
        output=out,
        run_id="test-run",
        commit="abc",
        progress=False,
        log=lambda *_: None,
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records
    assert sorted((r["impl"], r["batch_size"]) for r in lines) == sorted(
        [(i, b) for i in ("roofline", "hf-eager", "minqwen-eager", "minqwen-fast") for b in (1, 2)]
    )
    for r in lines:
        assert set(bench.KEYS) <= set(r)
        assert r["run_id"] == "test-run" and r["commit"] == "abc" and r["new_tokens"] == 32
        assert r["model"] == tiny_checkpoint.name and r["prompt_len"] == 6
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0


def test_run_refuses_compiled_hf_on_cpu_before_loading():
    cells = bench.plan(["7B"], ["hf-static-compile"], [1], [128])
    with pytest.raises(ValueError, match="only on a GPU"):
        bench.run_bench(cells, device="cpu", progress=False)


def test_default_output_names_device_and_date():
    path = bench.default_output(Path("book/data/bench"), "cpu")
    assert (
        path.parent == Path("book/data/bench")
        and path.name.startswith("cpu-")
        and path.suffix == ".jsonl"
    )
