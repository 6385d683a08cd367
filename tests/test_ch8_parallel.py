"""Chapter 8: tensor parallelism. A model split across two gloo processes generates what one process generates,
each rank reads only its slices, and every bad split or launch is one clear error before anything loads."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import left_pad, make_tiny_checkpoint, random_prompts

import minqwen
from minqwen.parallel.collectives import TensorParallel
from minqwen.parallel.launch import check_launch
from minqwen.parallel.sharding import check_split, rank_slice, shard

WORKER = Path(__file__).with_name("tp_worker.py")
PROMPTS = [[5, 9, 11, 3, 7, 40, 41], [17, 99, 3]]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, f"--nproc-per-node={processes}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"),
    )


def split_run(checkpoint, tmp_path, new_tokens: int = 12, prompts=PROMPTS) -> dict:
    out = tmp_path / "tp.json"
    done = torchrun(str(WORKER), str(checkpoint), str(out), str(new_tokens), json.dumps(prompts))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def one_process(model, new_tokens: int = 12, prompts=PROMPTS) -> dict:
    ids, mask = left_pad(prompts)
    greedy = dict(attention_mask=mask, eos_token_id=[], do_sample=False)
    sampled = dict(greedy, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    return {
        "greedy": minqwen.generate(model, ids, new_tokens, **greedy).tolist(),
        "sampled": minqwen.generate(model, ids, new_tokens, **sampled).tolist(),
    }


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_two_processes_generate_what_one_does(tied, tmp_path, tiny_checkpoint):
    """Greedy and seeded sampling, eager loop and fast engine, a left-padded batch: token for token."""

    checkpoint = (
        make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
        if tied
        else tiny_checkpoint
    )
    whole = minqwen.Qwen2.from_pretrained(checkpoint)
    expected = one_process(whole)
    split = split_run(checkpoint, tmp_path)
    assert split["ranks_agree"]
    for engine in ("eager", "fast"):
        for setting in ("greedy", "sampled"):
            assert split[f"{engine}-{setting}"] == expected[setting], (engine, setting)
    with torch.inference_mode():
        logits = whole(torch.tensor([PROMPTS[0][-3:]])).flatten()[:64]
    torch.testing.assert_close(torch.tensor(split["logits"]), logits, rtol=1e-5, atol=1e-5)
    # Each rank holds half of every split matrix; the norms are the only whole copies.
    norms = sum(p.numel() for n, p in whole.named_parameters() if "norm" in n)
    total = sum(p.numel() for p in whole.parameters())
    assert split["parameters"] == (total - norms) // 2 + norms


def test_the_embedded_model_splits_exactly(embedded_path, embedded_ours, tmp_path):
    """The real 0.5B on two CPU processes: its greedy and sampled tokens are the single process's."""
    prompts = [[9707, 11, 1246, 525, 498, 30], [785, 6722, 315]]
    split = split_run(embedded_path, tmp_path, new_tokens=8, prompts=prompts)
    expected = one_process(embedded_ours, new_tokens=8, prompts=prompts)
    assert split["ranks_agree"]
    assert split["eager-greedy"] == split["fast-greedy"] == expected["greedy"]
    assert split["eager-sampled"] == split["fast-sampled"] == expected["sampled"]


def test_the_cli_under_torchrun_prints_what_one_process_prints(embedded_path):
    args = ["-m", "minqwen", "generate", "Name a prime number.", "--greedy"]
    args += ["--max-new-tokens", "12"]
    split = torchrun(*args, "--tp", "2")
    alone = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert split.returncode == alone.returncode == 0, split.stderr[-2000:]
    assert split.stdout == alone.stdout and alone.stdout.strip()


def test_each_rank_reads_only_its_slices(tiny_checkpoint):
    """Loading for rank 1 of 2 reads each split weight as its half: the tensors own half the storage, and hold
    exactly the rows or columns `rank_slice` names. No process group is needed to load."""
    whole = dict(minqwen.Qwen2.from_pretrained(tiny_checkpoint).named_parameters())
    tp = TensorParallel(1, 2, "unused")
    split = minqwen.Qwen2.from_pretrained(tiny_checkpoint, tensor_parallel=tp)
    assert split.tensor_parallel == tp
    for name, param in split.named_parameters():
        full = whole[name]
        index = rank_slice(name, tuple(full.shape), tp)
        assert torch.equal(param, full if index is None else full[index]), name
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), name
        if index is not None:
            assert param.numel() * 2 == full.numel(), name
    attention = split.layers[0].self_attn
    assert (attention.heads, attention.kv_heads) == (2, 1)
    assert minqwen.StaticKVCache.for_model(split, 1, 8).keys.shape[2] == 1


def test_rank_slices():
    tp = TensorParallel(1, 4, "g")
    assert rank_slice("layers.0.self_attn.q_proj.weight", (64, 32), tp) == (
        slice(16, 32),
        slice(None),
    )
    assert rank_slice("layers.0.self_attn.q_proj.bias", (64,), tp) == (slice(16, 32),)
    assert rank_slice("layers.0.self_attn.o_proj.weight", (32, 64), tp) == (
        slice(None),
        slice(16, 32),
    )
    assert rank_slice("layers.0.mlp.down_proj.weight", (32, 64), tp) == (slice(None), slice(16, 32))
    assert rank_slice("embed_tokens.weight", (128, 32), tp) == (slice(32, 64), slice(None))
    assert rank_slice("layers.0.input_layernorm.weight", (32,), tp) is None
    assert rank_slice("norm.weight", (32,), tp) is None


@pytest.mark.parametrize(
    "world, fragments",
    [
        (3, ["3 ranks", "4 query heads", "2 key/value heads", "1, 2"]),
        (4, ["4 ranks", "2 key/value heads", "use a tensor-parallel size", "1, 2"]),
        (0, ["positive int"]),
        (True, ["positive int"]),
    ],
)
def test_a_bad_split_is_one_clear_error_before_loading(
    world, fragments, tiny_checkpoint, monkeypatch
):
    config = minqwen.ModelConfig.from_file(tiny_checkpoint)
    with pytest.raises(ValueError) as error:
        check_split(config, world)
    for fragment in fragments:
        assert fragment in str(error.value)

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the split was checked")

    monkeypatch.setattr(minqwen.model.qwen2, "_read_tensors", no_reading)
    if world in (3, 4):
        with pytest.raises(ValueError, match=f"{world} ranks"):
            minqwen.Qwen2.from_pretrained(
                tiny_checkpoint, tensor_parallel=TensorParallel(0, world, "g")
            )


def test_what_does_not_combine_with_a_split_model_says_so(tiny_checkpoint, tiny_ours):
    tp = TensorParallel(0, 2, "g")
    with pytest.raises(ValueError, match="quantize and tensor_parallel"):
        minqwen.Qwen2.from_pretrained(tiny_checkpoint, tensor_parallel=tp, quantize="int8")
    split = minqwen.Qwen2.from_pretrained(tiny_checkpoint, tensor_parallel=tp)
    with pytest.raises(ValueError, match="split across processes"):
        minqwen.quantize(split, "int8")
    ids = torch.tensor(random_prompts(0, [5]))
    with pytest.raises(ValueError, match="needs a seed"):
        minqwen.generate(split, ids, 4, do_sample=True)
    with pytest.raises(ValueError, match="needs a seed"):
        minqwen.FastQwen2(split).generate(ids, 4, do_sample=True)


def test_shard_of_a_loaded_model(tiny_ours):
    """`shard` on a model in memory keeps rank 0's slices: its first two query heads and their one kv head."""
    model = copy.deepcopy(tiny_ours)  # the fixture's model is shared
    shard(model, TensorParallel(0, 2, "g"))
    q = tiny_ours.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, q[: q.shape[0] // 2])
    o = tiny_ours.layers[0].self_attn.o_proj.weight
    assert torch.equal(model.layers[0].self_attn.o_proj.weight, o[:, : o.shape[1] // 2])
    head = tiny_ours.lm_head.weight
    assert torch.equal(model.lm_head.weight, head[: head.shape[0] // 2])


LAUNCH = {"RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}


@pytest.mark.parametrize(
    "env, tp, device, fragments",
    [
        ({}, 2, "cpu", ["torchrun --nproc-per-node 2"]),
        (LAUNCH, 3, "cpu", ["needs 3 processes", "torchrun started 2", "--nproc-per-node 3"]),
        (LAUNCH, 2, "cuda", ["no GPU of its own"]),
    ],
)
def test_a_bad_launch_is_one_clear_error(env, tp, device, fragments, monkeypatch):
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError) as error:
        check_launch(tp, device)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--tp", "2"], ["torchrun --nproc-per-node 2"]),
        (["--tp", "0"], ["--tp must be at least 1"]),
        (["--tp", "2", "--quantize", "int8"], ["--quantize does not combine with --tp"]),
        (["--tp", "2", "--draft", "prompt-lookup"], ["--draft does not combine with --tp"]),
    ],
)
def test_cli_refuses_a_bad_tp_before_loading(flags, fragments):
    from test_ch4_cli import assert_one_line_error, run_cli

    done = run_cli("generate", "hi", "--model", "no-such-model", *flags)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, *fragments)


def test_bench_under_torchrun_measures_the_split_engines(tmp_path):
    """`bench --tp 2` on two CPU processes: each rank makes its share of the model, rank 0 alone writes one line
    per cell and the roofline of two ranks' bandwidth."""
    out = tmp_path / "bench.jsonl"
    args = ["-m", "minqwen", "bench", "--tp", "2", "--models", "0.5B"]
    args += ["--impls", "minqwen-eager,minqwen-fast", "--batches", "1", "--prompts", "8"]
    # A warm-up call first: a cold first call can outlast the timed one and leave the cell unmeasured.
    args += ["--new-tokens", "6", "--repeats", "1", "--warmup", "1", "--no-progress"]
    done = torchrun(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in records] == ["roofline", "minqwen-eager", "minqwen-fast"]
    assert all(r["tp"] == 2 and r["decode_tok_s"] > 0 for r in records)
    from minqwen.model.sizes import as_config
    from minqwen.tools.bench import roofline

    r = records[0]
    both = roofline(
        as_config("0.5B"),
        1,
        8,
        6,
        "float32",
        2 * r["copy_bytes_per_s"],
        2 * r["matmul_flops_per_s"],
    )
    assert r["decode_tok_s"] == pytest.approx(both["decode_tok_s"])


def test_bench_refuses_hf_under_tp():
    from test_ch4_cli import assert_one_line_error, run_cli

    done = run_cli("bench", "--tp", "2", "--impls", "hf-eager")
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "only minqwen-eager and minqwen-fast")
