"""Chapter 4: the command line. `generate` and `chat` stream text; bad input is one line on stderr and exit code 2."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import minqwen
from minqwen.__main__ import main
from minqwen.engine.generate import generate


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


NO_TRANSFORMERS = """
import sys
from minqwen.__main__ import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
print("transformers modules:", len(loaded), loaded[:3], file=sys.stderr)
sys.exit(code if not loaded else 99)
"""


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_run_without_transformers(tiny_checkpoint_with_tokenizer, command):
    """minqwen's own tokenizer, chat template, model and loop: transformers is never imported."""
    args = ["--model", str(tiny_checkpoint_with_tokenizer), "--max-new-tokens", "4"]
    args = [command, *(["hello"] if command == "generate" else []), *args]
    result = subprocess.run(
        [sys.executable, "-c", NO_TRANSFORMERS, *args],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "transformers modules: 0 []" in result.stderr


def test_fast_engine_prints_what_the_eager_loop_prints(tiny, capsys):
    folder, _, _ = tiny
    args = ["generate", "你好", "--model", str(folder), "--max-new-tokens", "12", "--seed", "4"]
    outputs = []
    for engine in ("eager", "fast"):
        assert main([*args, "--temperature", "0.9", "--engine", engine]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_stats_reports_prefill_and_decode_speed(tiny, capsys):
    folder, _, _ = tiny
    assert main(["generate", "hi", "--model", str(folder), "--max-new-tokens", "6", "--stats"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefill" in err[0] and "decode" in err[0] and "tok/s" in err[0]


def test_chat_saves_and_loads_a_conversation(tiny, tmp_path, monkeypatch, capsys):
    folder, _, _ = tiny
    saved = tmp_path / "talk.json"
    monkeypatch.setattr(sys, "stdin", piped(f"hello\n/save {saved}\n"))
    common = ["chat", "--model", str(folder), "--greedy", "--max-new-tokens", "5"]
    assert main(common) == 0
    first_reply = capsys.readouterr().out.splitlines()[0]
    messages = json.loads(saved.read_text())["messages"]
    assert messages == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first_reply},
    ]
    monkeypatch.setattr(sys, "stdin", piped("and then?\n"))
    assert main([*common, "--load", str(saved)]) == 0
    _, _, tokenizer = tiny
    ids = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": "and then?"}],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    assert capsys.readouterr().out == expected_reply(tiny[1], tokenizer, ids, 5) + "\n"


def test_embedded_greedy_prints_what_hf_generate_decodes(embedded_hf, embedded_tokenizer):
    """`--greedy` is do_sample=False with the checkpoint's other defaults, as in `hf.generate`."""
    prompt = "Write a Python function that checks whether a number is prime."
    result = run_cli("generate", prompt, "--greedy", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    ids = embedded_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.inference_mode():
        out = embedded_hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40
        )
    expected = embedded_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.stdout == expected + "\n"
