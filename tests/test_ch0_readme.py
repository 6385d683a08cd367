"""The README, followed as a new user would: every command it shows is run here or by CI, exactly as written.

`COVERAGE` names, for each command in the README's code blocks, the test that runs it; the first test fails when
the README gains a command nobody runs, or loses one this file still claims to cover.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_tiny_checkpoint

import minqwen

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB_MODEL = "Qwen/Qwen2.5-7B-Instruct"
THIS = "tests/test_ch0_readme.py"

COVERAGE = {
    "make book": f"{THIS}::test_make_book_executes_every_notebook_then_renders_the_site",
    "make test": f"{THIS}::test_ci_runs_make_test",
    "make lab": f"{THIS}::test_make_lab",
    f"MINQWEN_MODEL={HUB_MODEL} MINQWEN_DEVICE=cuda make lab": f"{THIS}::test_make_lab",
    ". .venv/bin/activate": f"{THIS}::test_command_line_block",
    'python -m minqwen generate "你好"': f"{THIS}::test_command_line_block",
    "python -m minqwen chat": f"{THIS}::test_command_line_block",
    "python -m minqwen fetch embedded": f"{THIS}::test_command_line_block",
    "python -m minqwen info": f"{THIS}::test_command_line_block",
}


def readme_blocks() -> list[list[str]]:
    """The commands of each ```bash block, one per line, comments and blank lines dropped."""
    blocks = re.findall(
        r"^```(?:bash|sh|shell|console)\n(.*?)^```", README.read_text(), re.S | re.M
    )
    return [
        [
            line.split(" #")[0].strip()
            for line in b.splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for b in blocks
    ]


def test_every_readme_command_is_run_by_a_test():
    commands = [command for block in readme_blocks() for command in block]
    assert commands, "the README shows no command"
    assert set(commands) == set(COVERAGE), (
        f"README commands no test runs: {sorted(set(commands) - set(COVERAGE))}; "
        f"covered commands the README no longer shows: {sorted(set(COVERAGE) - set(commands))}"
    )
    for node in set(COVERAGE.values()):
        file, name = node.split("::")
        functions = {
            f.name
            for f in ast.walk(ast.parse((ROOT / file).read_text()))
            if isinstance(f, ast.FunctionDef)
        }
        assert name in functions, f"{node} does not exist"


def test_ci_runs_make_test():
    """`make test` is CI's one command: .ci/run, on a fresh clone, runs it and nothing after it."""
    script = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "make test"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_environment_yml_installs_exactly_requirements_txt():
    environment = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*- -r requirements\.txt$", environment, re.M)
    pins = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+]+", pin) for pin in pins), (
        "requirements.txt pins exactly"
    )


def _make(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_make_book_executes_every_notebook_then_renders_the_site(tmp_path):
    """`make book` is `make execute` then `make site`; `make site` runs in `make test`, so execute is run here.

    It runs on a copy of one notebook (the whole book takes CI's nbval step): the Makefile's own recipe, with
    NOTEBOOKS pointed at the copy, must execute it in place and leave fresh outputs. Executing it again must
    leave the file as it was: cell ids come from the cells, and no timestamps are recorded.
    """
    plan = _make("--dry-run", "--always-make", "book").stdout
    notebooks = " ".join(sorted(map(str, ROOT.glob("book/notebooks/*/*.py"))))
    executes = plan.find("scripts/execute_notebooks.py " + notebooks.replace(f"{ROOT}/", ""))
    assert 0 <= executes < plan.index("jupyter-book build book")
    source = ROOT / "book" / "notebooks" / "ch0" / "00_environment.py"
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    result = _make("execute", f"NOTEBOOKS={copy}", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    first = copy.with_suffix(".ipynb").read_text()
    executed = json.loads(first)
    code = [cell for cell in executed["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["execution_count"] for cell in code)
    assert not [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]
    assert not [cell["id"] for cell in code if "execution" in cell["metadata"]]
    result = _make("execute", f"NOTEBOOKS={copy}", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    again = json.loads(copy.with_suffix(".ipynb").read_text())
    assert [c["id"] for c in again["cells"]] == [c["id"] for c in executed["cells"]]


def test_command_line_block():
    """The README's command-line block, run as written by bash, with one chat message on stdin."""
    (block,) = [b for b in readme_blocks() if any("python -m minqwen" in c for c in b)]
    result = subprocess.run(
        ["bash", "-euc", "\n".join(block)],
        cwd=ROOT,
        input="你好\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    replies = re.findall(r"[\u4e00-\u9fff]", out)
    assert len(replies) >= 2, f"generate and chat should each answer in Chinese: {out!r}"
    assert re.search(r"^/\S+/Qwen2.5-Coder-0.5B-Instruct$", out, re.M), (
        "fetch prints the checkpoint folder"
    )
    assert "largest Qwen2.5 size for" in out


# --- make lab -----------------------------------------------------------------------------------------------


def _seed_hub_cache(hf_home: Path) -> Path:
    """An HF cache holding a (tiny) checkpoint under the hub id, as on a GPU box that has downloaded it."""
    repo = hf_home / "hub" / f"models--{HUB_MODEL.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    make_tiny_checkpoint(
        snapshot, vocab_size=151936, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643
    )
    for file in minqwen.weights.ASSETS.iterdir():  # a real snapshot carries its tokenizer
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _run_in_kernel(server: str, token: str, runtime: Path, code: str) -> str:
    """Start a kernel through the server's REST API and run `code` in it; return what it printed."""
    from jupyter_client import BlockingKernelClient

    request = urllib.request.Request(
        f"{server}/api/kernels?token={token}", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        kernel_id = json.loads(response.read())["id"]
    client = BlockingKernelClient(connection_file=str(runtime / f"kernel-{kernel_id}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        printed = []
        reply = client.execute_interactive(
            code,
            timeout=180,
            output_hook=lambda msg: (
                msg["msg_type"] == "stream" and printed.append(msg["content"]["text"])
            ),
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(printed)
    finally:
        client.stop_channels()


@pytest.mark.parametrize("where", ["laptop", "gpu-box"])
def test_make_lab(tmp_path, where):
    """`make lab` serves the notebooks with .py files opening as notebooks, and its kernels see the settings.

    The GPU-box line runs as written; the hub model comes from an HF cache seeded with a tiny checkpoint (no hub
    here), and with no GPU the notebooks' DEVICE falls back to the CPU.
    """
    settings = ("MINQWEN_MODEL", "MINQWEN_DEVICE", "MINQWEN_DTYPE")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in settings and not k.startswith(("MAKE", "MFLAGS"))
    }
    runtime = tmp_path / "runtime"
    env.update(
        JUPYTER_RUNTIME_DIR=str(runtime),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    if where == "gpu-box":
        snapshot = _seed_hub_cache(tmp_path / "hf")
        env.update(
            HF_HOME=str(tmp_path / "hf"),
            HF_HUB_OFFLINE="1",
            MINQWEN_MODEL=HUB_MODEL,
            MINQWEN_DEVICE="cuda",
        )
    port, token = _free_port(), secrets.token_hex(16)
    lab_args = f"--no-browser --port={port} --port-retries=0 --IdentityProvider.token={token}"
    log = (tmp_path / "lab.log").open("w+")
    lab = subprocess.Popen(
        ["make", "lab", f"LAB_ARGS={lab_args}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert lab.poll() is None, (
                f"make lab exited with {lab.returncode}:\n{Path(log.name).read_text()}"
            )
            try:
                _get(f"{server}/api/status?token={token}")
                break
            except OSError:
                assert time.monotonic() < deadline, (
                    f"JupyterLab did not start:\n{Path(log.name).read_text()}"
                )
                time.sleep(1)
        opened = _get(f"{server}/api/contents/ch0/00_environment.py?type=notebook&token={token}")
        assert (
            opened["type"] == "notebook"
            and opened["content"]["cells"][0]["cell_type"] == "markdown"
        )
        pairing = opened["content"]["metadata"]["jupytext"]["formats"]
        assert pairing == "ipynb,py:percent"
        viewers = _get(
            f"{server}/lab/api/settings/@jupyterlab/docmanager-extension:plugin?token={token}"
        )
        assert (
            viewers["schema"]["properties"]["defaultViewers"]["default"]["python"]
            == "Jupytext Notebook"
        )
        code = "import helpers; print(helpers.MODEL_SOURCE, helpers.DEVICE, helpers.model_path())"
        printed = _run_in_kernel(server, token, runtime, code)
        source, device, path = printed.split()
        if where == "gpu-box":
            assert (source, Path(path)) == (HUB_MODEL, snapshot)
            assert device == ("cuda" if _has_cuda() else "cpu")
        else:
            assert (source, device, Path(path).name) == (
                "embedded",
                "cpu",
                "Qwen2.5-Coder-0.5B-Instruct",
            )
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=60)
        log.close()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
