"""Command line: `python -m minqwen {fetch,info,generate,chat,bench}`."""

from __future__ import annotations

import argparse
import json
import sys

from . import bench
from .config import ConfigError
from .hardware import HEADROOM, hardware, memory_estimate, recommend_size
from .sizes import SIZES
from .weights import FetchError, fetch

GIB = 1 << 30
DTYPES = ("float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _fetch(args) -> int:
    print(fetch(args.source))
    return 0


def _info(args) -> int:
    report = hardware()
    for key, value in report.to_dict().items():
        if key.endswith("_bytes") and value is not None:
            value = f"{value / GIB:.1f} GiB"
        print(f"{key:24} {value}")
    where = "GPU" if report.gpu else "RAM available"
    print(
        f"\nlargest Qwen2.5 size for {report.accelerator_bytes / GIB:.1f} GiB of {where} "
        f"(context {args.context}, batch {args.batch}, {HEADROOM:.0%} headroom):"
    )
    for dtype in ("bfloat16", "float32"):
        best = recommend_size(report.accelerator_bytes, dtype, args.context, args.batch)
        need = ", ".join(
            f"{s} {memory_estimate(s, dtype, args.context, args.batch)['total'] / GIB:.1f}"
            for s in SIZES
        )
        print(f"  {dtype:9} -> {best or 'none fits'}   (GiB needed: {need})")
    return 0


# --- generate and chat ---------------------------------------------------------------------------------------

_SAMPLING_ONLY = (
    "temperature",
    "top_k",
    "top_p",
)  # meaningless without sampling, unlike the penalty
_SAMPLING_FLAGS = (*_SAMPLING_ONLY, "repetition_penalty")


class Session:
    """A loaded model, its tokenizer and the generation settings: the checkpoint's defaults, then the flags."""

    def __init__(self, args):
        import torch

        from .sampling import SamplingConfig

        sampling_flags = [
            f"--{f.replace('_', '-')}" for f in _SAMPLING_ONLY if getattr(args, f) is not None
        ]
        if args.greedy and sampling_flags:
            raise ValueError(
                f"--greedy turns sampling off, so {', '.join(sampling_flags)} would be ignored; drop one or the other"
            )
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device {args.device}: torch sees no CUDA GPU on this machine; pass --device cpu"
            )
        # Check the flags alone first, so a bad value fails before the model loads.
        SamplingConfig(
            **{f: getattr(args, f) for f in _SAMPLING_FLAGS if getattr(args, f) is not None}
        )

        # fetch verified the checkpoint when it wrote it; hashing gigabytes again on every prompt is not worth it.
        folder = fetch(args.model, verify=False)
        defaults = _generation_defaults(folder)
        settings = {f: defaults[f] for f in _SAMPLING_FLAGS if defaults.get(f) is not None}
        settings.update(
            {f: getattr(args, f) for f in _SAMPLING_FLAGS if getattr(args, f) is not None}
        )
        settings["do_sample"] = not args.greedy and bool(defaults.get("do_sample", False))
        if sampling_flags:
            settings["do_sample"] = (
                True  # asking for a temperature, top-k or top-p means asking to sample
            )
        self.sampling = vars(SamplingConfig(**settings))
        self.max_new_tokens = args.max_new_tokens
        self.stop = args.stop

        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .model import Qwen2

        hf_logging.set_verbosity_error()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = Qwen2.from_pretrained(
            folder, dtype=getattr(torch, args.dtype), device=args.device
        )

    def encode(self, messages: list[dict] | str) -> list[int]:
        """Chat messages through the checkpoint's chat template, or raw text as it is."""
        if isinstance(messages, str):
            return self.tokenizer(messages, add_special_tokens=False)["input_ids"]
        if not self.tokenizer.chat_template:
            raise ValueError(
                "this checkpoint's tokenizer has no chat template; use `generate --raw`"
            )
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        return list(encoded["input_ids"])

    def reply(self, ids: list[int], seed: int | None) -> str:
        """Stream the continuation of `ids` to stdout and return its text."""
        from .streaming import stream

        pieces = stream(
            self.model,
            self.tokenizer,
            ids,
            self.max_new_tokens,
            stop=self.stop,
            seed=seed,
            **self.sampling,
        )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return pieces.text


def _generation_defaults(folder) -> dict:
    path = folder / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system is not None else []


def _generate(args) -> int:
    if not args.prompt:
        raise ValueError(
            'the prompt is empty; pass the text to continue, e.g. generate "Write a haiku"'
        )
    if args.raw and args.system is not None:
        raise ValueError(
            "--system needs the chat template, which --raw turns off; drop one or the other"
        )
    session = Session(args)
    user = [{"role": "user", "content": args.prompt}]
    ids = session.encode(args.prompt if args.raw else _messages(args.system) + user)
    session.reply(ids, args.seed)
    return 0


def _chat(args) -> int:
    session = Session(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    messages = _messages(args.system)
    turn = 0
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = _messages(args.system)
            continue
        messages.append({"role": "user", "content": text})
        # A seeded chat is reproducible as a whole, while each turn still draws differently.
        seed = None if args.seed is None else args.seed + turn
        messages.append(
            {"role": "assistant", "content": session.reply(session.encode(messages), seed)}
        )
        turn += 1


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="embedded", help="any minqwen.fetch source (default: embedded)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--greedy", action="store_true", help="always pick the most likely token (no sampling)"
    )
    p.add_argument("--temperature", type=float, help="default: the checkpoint's generation_config")
    p.add_argument(
        "--top-k", type=int, help="default: the checkpoint's generation_config (0 turns it off)"
    )
    p.add_argument(
        "--top-p", type=float, help="default: the checkpoint's generation_config (1 turns it off)"
    )
    p.add_argument(
        "--repetition-penalty", type=float, help="default: the checkpoint's generation_config"
    )
    p.add_argument("--seed", type=int, help="seed for sampling, for output that repeats")
    p.add_argument("--system", help="system message (default: the chat template's own)")
    p.add_argument("--stop", action="append", help="stop string, not printed (repeat for several)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m minqwen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="fetch and verify a checkpoint, print its folder")
    p.add_argument(
        "source",
        nargs="?",
        default="embedded",
        help="embedded, embedded-1.5b, random:<size>, a hub id or a folder",
    )
    p.set_defaults(run=_fetch)
    p = commands.add_parser("info", help="hardware report and the largest size that fits")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(run=_info)
    p = commands.add_parser("generate", help="stream the model's answer to one prompt")
    p.add_argument("prompt")
    p.add_argument(
        "--raw", action="store_true", help="continue the prompt as is, without the chat template"
    )
    _add_generation_options(p)
    p.set_defaults(run=_generate)
    p = commands.add_parser(
        "chat", help="multi-turn chat on stdin (interactive or piped, one message a line)"
    )
    _add_generation_options(p)
    p.set_defaults(run=_chat)
    p = commands.add_parser(
        "bench", help="prefill and decode tok/s of each implementation, beside the roofline"
    )
    bench.add_arguments(p)
    p.set_defaults(run=bench.cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FetchError, ConfigError, ValueError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
