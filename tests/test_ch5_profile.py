"""Chapter 5: the script that measured the committed decode profile computes what it claims, on a CPU.

`scripts/gpu_decode_profile.py` ran on an H200 to produce book/data/profile/; on a CPU it runs its eager path
(no graphs, no profile), which is enough to check its byte count and roofline against minqwen.model.sizes. The
waterfall and decode-kernel scripts run their CPU parts too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minqwen.model.config import ModelConfig
from minqwen.model.sizes import kv_cache_bytes_per_token, weight_bytes_per_step

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *arguments: str, **env: str) -> list[dict]:
    """scripts/`name` run with `arguments` (its last two `--out PATH`): the JSON lines it wrote."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *arguments],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
    )
    return [json.loads(line) for line in Path(arguments[-1]).read_text().splitlines()]


@pytest.fixture(scope="module")
def cpu_profile(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "profile.jsonl"
    header, *rows = run_script(
        "gpu_decode_profile.py",
        *["--device", "cpu", "--sizes", str(tiny_checkpoint), "--contexts", "24,40"],
        *["--steps", "4", "--repeats", "1", "--out", str(out)],
    )
    return header, rows


def test_header_names_the_machine(cpu_profile):
    header, _ = cpu_profile
    assert header["header"] and header["hardware"]["torch"] and "cpu_cores" in header["hardware"]


def test_one_row_per_context_with_its_bytes_and_roofline(cpu_profile, tiny_checkpoint):
    _, rows = cpu_profile
    config = ModelConfig.from_file(tiny_checkpoint)
    assert [r["context"] for r in rows] == [24, 40]
    for r in rows:
        expected = weight_bytes_per_step(config, "float32") + r[
            "context"
        ] * kv_cache_bytes_per_token(config, "float32")
        assert r["bytes_per_step"] == expected
        assert r["roofline_ms"] == pytest.approx(expected / r["copy_bytes_per_s"] * 1e3)
        assert r["prompt"] == r["context"] - r["steps"] // 2
        assert isinstance(r["eager_step_ms"], float)
        assert "graphs_step_ms" not in r and "kernels" not in r


def test_waterfall_script_measures_each_cpu_variant_against_its_roofline(tiny_checkpoint, tmp_path):
    """scripts/gpu_waterfall.py (ch5/02's bars) on a CPU: one line per variant that runs there, in order, each
    with a rate and the roofline of minqwen.tools.bench for the same cell."""
    from minqwen.tools.bench import roofline

    out = tmp_path / "waterfall.jsonl"
    arguments = ["--device", "cpu", "--sizes", str(tiny_checkpoint), "--prompt", "8"]
    arguments += ["--new-tokens", "6", "--repeats", "1", "--out", str(out)]
    header, *rows = run_script("gpu_waterfall.py", *arguments)
    assert header["header"] and header["copy_bytes_per_s"] > 0
    assert [r["variant"] for r in rows] == ["hf-eager", "minqwen-eager", "static-cache"]
    config = ModelConfig.from_file(tiny_checkpoint)
    bound = roofline(config, 1, 8, 6, "float32", header["copy_bytes_per_s"], float("inf"))
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["dtype"] == "float32"
        assert r["roofline_decode_tok_s"] == pytest.approx(bound["decode_tok_s"])


def test_decode_kernels_script_checks_the_kernels_greedy_tokens_on_a_cpu(tiny_checkpoint, tmp_path):
    """scripts/gpu_decode_kernels.py (ch5/05's tiles, checks and timings) on a CPU runs its check part in Triton's
    interpreter: the fast engine with the kernels writes the eager loop's greedy tokens in float32."""
    out = tmp_path / "kernels.jsonl"
    arguments = ["--device", "cpu", "--sizes", str(tiny_checkpoint), "--out", str(out)]
    header, *rows = run_script("gpu_decode_kernels.py", *arguments, TRITON_INTERPRET="1")
    assert header["header"] and header["copy_bytes_per_s"] > 0
    assert [(r["part"], r["dtype"], r["prompt"]) for r in rows] == [
        ("check", "float32", prompt) for prompt in range(3)
    ]
    assert all(r["same"] == r["new_tokens"] == 32 for r in rows)
