"""Chapter 4: the command line. `generate` and `chat` stream text; bad input is one line on stderr and exit code 2."""

import io
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import minqwen
from minqwen.__main__ import main
from minqwen.generate import generate


def run_cli(*args, stdin=None):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "minqwen", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
    )


def piped(text: str | bytes) -> io.TextIOWrapper:
    """stdin as a pipe delivers it: bytes underneath, not a tty."""
    data = text.encode() if isinstance(text, str) else text
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def assert_one_line_error(stderr: str, *fragments: str):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["generate", "hi", "--top-p", "2"], ["top_p", "got 2.0"]),
        (["generate", "hi", "--top-p", "0"], ["top_p"]),
        (["generate", "hi", "--temperature", "-1"], ["temperature"]),
        (["generate", "hi", "--top-k", "-5"], ["top_k"]),
        (["generate", "hi", "--repetition-penalty", "0"], ["repetition_penalty"]),
        (["generate", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["generate", "hi", "--greedy", "--top-k", "5"], ["--greedy", "--top-k"]),
        (["generate", "hi", "--model", "no-such-model"], ["unknown model source 'no-such-model'"]),
        (["generate", "hi", "--model", "random:9B"], ["9B"]),
        (["chat", "--model", "random:9B"], ["9B"]),
        (["generate", "hi", "--dtype", "int8"], ["--dtype", "int8"]),
        (["generate", "hi", "--seed", "abc"], ["--seed"]),
        (["generate", ""], ["prompt is empty"]),
        (["generate", "hi", "--raw", "--system", "be brief"], ["--system", "--raw"]),
        (["generate"], ["prompt"]),
        (["summon"], ["summon"]),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, args, fragments):
    assert exit_code(args) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


def exit_code(args) -> int:
    """main()'s exit code, whether it returns one or argparse exits with it."""
    try:
        return main(args)
    except SystemExit as exit:
        return exit.code


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "config.json")


def test_no_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "hi", "--device", "cuda"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--device cuda")


def test_prompt_beyond_the_context_is_rejected(tiny_checkpoint_with_tokenizer, capsys):
    code = main(
        [
            "generate",
            "hi",
            "--raw",
            "--model",
            str(tiny_checkpoint_with_tokenizer),
            "--max-new-tokens",
            "1000",
        ]
    )
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "max_position_embeddings (256)")


def test_errors_from_a_fresh_process_carry_no_traceback():
    result = run_cli("generate", "你好", "--top-p", "2")
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line_error(result.stderr, "top_p")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_with_tokenizer):
    folder = tiny_checkpoint_with_tokenizer
    return folder, minqwen.Qwen2.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def expected_reply(model, tokenizer, ids, max_new_tokens, **settings) -> str:
    new = generate(model, torch.tensor([ids]), max_new_tokens, eos_token_id=151645, **settings)[
        0, len(ids) :
    ]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_raw_streams_what_generate_returns(tiny, capsys):
    folder, model, tokenizer = tiny
    assert (
        main(
            [
                "generate",
                "Once upon a time",
                "--raw",
                "--model",
                str(folder),
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    ids = tokenizer("Once upon a time")["input_ids"]
    assert capsys.readouterr().out == expected_reply(model, tokenizer, ids, 12) + "\n"


def test_generate_applies_the_chat_template_and_system_message(tiny, capsys):
    folder, model, tokenizer = tiny
    args = [
        "generate",
        "你好",
        "--system",
        "Answer in Chinese.",
        "--model",
        str(folder),
        "--max-new-tokens",
        "10",
        "--seed",
        "3",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
    ]
    assert main(args) == 0
    messages = [
        {"role": "system", "content": "Answer in Chinese."},
        {"role": "user", "content": "你好"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    reply = expected_reply(
        model, tokenizer, ids, 10, do_sample=True, seed=3, temperature=0.9, top_k=40
    )
    assert capsys.readouterr().out == reply + "\n"


def test_chat_reads_turns_from_a_pipe_and_keeps_the_history(tiny, capsys, monkeypatch):
    folder, model, tokenizer = tiny
    monkeypatch.setattr(sys, "stdin", piped("hello\n\n你好吗\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(folder), "--greedy", "--max-new-tokens", "6"]) == 0
    messages, replies = [], []
    for turn in ("hello", "你好吗"):
        messages.append({"role": "user", "content": turn})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
        replies.append(expected_reply(model, tokenizer, ids, 6))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert capsys.readouterr().out == "".join(r + "\n" for r in replies)


def test_embedded_generate_streams_chinese(embedded_path):
    result = run_cli("generate", "你好", "--greedy", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "\ufffd" not in result.stdout
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in result.stdout) >= 3


def test_embedded_chat_from_a_pipe(embedded_path):
    result = run_cli(
        "chat", "--greedy", "--max-new-tokens", "12", "--stop", "。", stdin="用中文说你好\n"
    )
    assert result.returncode == 0, result.stderr
    reply = result.stdout.strip()
    assert reply and "。" not in reply and any("\u4e00" <= ch <= "\u9fff" for ch in reply)
