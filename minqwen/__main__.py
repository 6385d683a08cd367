"""Command line: `python -m minqwen {fetch,info,generate,chat,bench}`.

Every error is one line on stderr and exit code 2, raised before the model loads wherever the arguments alone
show it. Ctrl-C exits with 130 at any moment, and a closed pipe (`... | head`) ends the run quietly. The heavy
modules (torch, the model) are imported inside `main`, so that even an interrupt during `import torch` is handled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("fast", "eager")
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141
SAMPLING_ONLY = (
    "temperature",
    "top_k",
    "top_p",
)  # meaningless without sampling, unlike the penalty


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other error here."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _fetch(args) -> int:
    """Fetch and verify a checkpoint, and read its configs and tokenizer as generate would load them."""
    from minqwen.engine.sampling import SamplingConfig
    from minqwen.model.config import ModelConfig
    from minqwen.tokenizer import BPETokenizer
    from minqwen.weights import fetch

    folder = fetch(args.source, trust=args.trust)
    defaults = ModelConfig.from_file(folder).sampling_defaults
    try:
        SamplingConfig.resolve(defaults)
    except ValueError as error:
        raise ValueError(f"{folder / 'generation_config.json'}: {error}") from None
    BPETokenizer.from_file(folder)
    print(folder)
    return 0


def _info(args) -> int:
    from minqwen.model.sizes import SIZES
    from minqwen.tools.hardware import HEADROOM, hardware_report, memory_estimate, recommend_size

    report = hardware_report()
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


def _settings(args) -> dict:
    """The sampling settings the flags pass; each one left out comes from the checkpoint, as in transformers."""
    from minqwen.engine.sampling import SamplingConfig

    sampling_flags = [
        f"--{f.replace('_', '-')}" for f in SAMPLING_ONLY if getattr(args, f) is not None
    ]
    if args.greedy and sampling_flags:
        raise ValueError(
            f"--greedy turns sampling off, so {', '.join(sampling_flags)} would be ignored; drop one or the other"
        )
    settings = {
        f: getattr(args, f)
        for f in (*SAMPLING_ONLY, "repetition_penalty")
        if getattr(args, f) is not None
    }
    if args.greedy:
        settings["do_sample"] = False
    elif sampling_flags:
        settings["do_sample"] = (
            True  # asking for a temperature, top-k or top-p means asking to sample
        )
    SamplingConfig.resolve({}, **settings)  # the values alone, checked before anything loads
    return settings


class Session:
    """A loaded model and engine, its tokenizer, and the settings of every reply."""

    def __init__(self, args):
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.group_size is not None and args.quantize != "int4":
            raise ValueError("--group-size goes with --quantize int4; add it, or drop --group-size")
        _check_draft(args)
        _check_tensor_parallel(args)
        self.settings = _settings(args)
        from minqwen.tools.hardware import check_device

        device = check_device(args.device)
        engine = args.engine or ("fast" if device.type == "cuda" and not args.draft else "eager")
        import torch

        from minqwen.parallel import launch

        self.tp = None
        if args.tp is not None:
            self.tp, device = launch.join(args.tp, device.type)

        from minqwen.engine.fast import FastQwen2
        from minqwen.engine.sampling import SamplingConfig
        from minqwen.model.qwen2 import Qwen2
        from minqwen.tokenizer import BPETokenizer
        from minqwen.weights import fetch

        # A folder without a manifest loads with a warning. Rank 0 fetches first, so ranks never race to unpack.
        on_rank_0 = fetch(args.model, trust=True) if self.rank == 0 else None
        folder = launch.broadcast(on_rank_0, self.tp)
        self.tokenizer = BPETokenizer.from_file(folder)
        model = Qwen2.from_pretrained(
            folder,
            dtype=getattr(torch, args.dtype),
            device=device,
            quantize=args.quantize,
            group_size=args.group_size,
            tensor_parallel=self.tp,
        )
        SamplingConfig.resolve(model.config.sampling_defaults, **self.settings)
        self.engine = FastQwen2(model) if engine == "fast" else model
        if args.draft:
            from minqwen.engine.speculative import PROMPT_LOOKUP, SpeculativeDecoder

            draft = args.draft
            if draft != PROMPT_LOOKUP:
                draft = Qwen2.from_pretrained(
                    fetch(draft, trust=True), dtype=getattr(torch, args.dtype), device=device
                )
            self.engine = SpeculativeDecoder(model, draft, num_draft_tokens=args.num_draft_tokens)
        self.max_new_tokens, self.stop, self.stats = args.max_new_tokens, args.stop, args.stats

    @property
    def rank(self) -> int:
        return 0 if self.tp is None else self.tp.rank

    def read_line(self) -> bytes:
        """The next line of stdin, read by rank 0 and handed to every rank."""
        from minqwen.parallel.launch import broadcast

        return broadcast(sys.stdin.buffer.readline() if self.rank == 0 else None, self.tp)

    def close(self) -> None:
        from minqwen.parallel.launch import leave

        self.engine = None  # its CUDA graphs hold the collectives' communicator, which `leave` ends
        leave()

    def encode(self, messages: list[dict] | str) -> list[int]:
        """Chat messages through the ChatML template, or raw text as it is."""
        from minqwen.tokenizer import render_chat

        text = (
            messages
            if isinstance(messages, str)
            else render_chat(messages, add_generation_prompt=True)
        )
        return self.tokenizer.encode(text)

    def reply(self, ids: list[int], seed: int | None) -> str:
        """Stream the continuation of `ids` to stdout and return its text."""
        from minqwen.engine.streaming import stream
        from minqwen.parallel.launch import broadcast

        if self.tp is not None and seed is None:
            # Unseeded sampling, but every rank must draw the same tokens: rank 0 picks the seed for all.
            seed = broadcast(int.from_bytes(os.urandom(4)), self.tp)
        started = time.perf_counter()
        pieces = stream(
            self.engine,
            self.tokenizer,
            ids,
            self.max_new_tokens,
            stop=self.stop,
            seed=seed,
            **self.settings,
        )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.stats:
            print(_speed(len(ids), pieces, started), file=sys.stderr)
            drafted = getattr(self.engine, "stats", None)
            if drafted is not None:
                print(
                    f"[speculative: {drafted.rounds} rounds, {drafted.accepted} of {drafted.drafted} drafts "
                    f"accepted ({drafted.acceptance_rate:.0%}), {drafted.tokens_per_pass:.2f} tokens per "
                    f"target pass]",
                    file=sys.stderr,
                )
        return pieces.text


def _speed(prompt_tokens: int, pieces, started: float) -> str:
    """Prefill and decode tok/s of one reply, from the arrival times of its tokens."""
    first, last = pieces.token_times[0], pieces.token_times[-1]
    new = len(pieces.token_times)
    decode = f"{(new - 1) / (last - first):,.1f} tok/s" if new > 1 and last > first else "n/a"
    return (
        f"[{prompt_tokens} prompt tokens: prefill {prompt_tokens / (first - started):,.0f} tok/s; "
        f"{new} new tokens: decode {decode}]"
    )


def _check_draft(args) -> None:
    """--draft and --num-draft-tokens, before anything loads."""
    if args.num_draft_tokens is not None and not args.draft:
        raise ValueError(
            "--num-draft-tokens goes with --draft; add --draft, or drop --num-draft-tokens"
        )
    if not args.draft:
        return
    if args.num_draft_tokens is None:
        from minqwen.engine.speculative import DEFAULT_DRAFT_TOKENS

        args.num_draft_tokens = DEFAULT_DRAFT_TOKENS
    if args.num_draft_tokens < 1:
        raise ValueError(f"--num-draft-tokens must be at least 1, got {args.num_draft_tokens}")
    if args.engine == "fast":
        raise ValueError(
            "--draft runs on the eager engine for now (chapter 7); drop --engine fast, or drop --draft"
        )
    if args.quantize and args.draft != "prompt-lookup":
        raise ValueError(
            "--quantize applies to the target only and the draft model would stay in float: drop one, or "
            "use --draft prompt-lookup"
        )


def _check_tensor_parallel(args) -> None:
    """--tp, before anything loads: the value, the launch, and what it does not combine with yet."""
    if args.tp is None:
        return
    if args.tp < 1:
        raise ValueError(f"--tp must be at least 1, got {args.tp}")
    for flag, value in (("--quantize", args.quantize), ("--draft", args.draft)):
        if value:
            raise ValueError(
                f"{flag} does not combine with --tp yet (chapter 8); drop one of the two"
            )
    from minqwen.parallel.launch import check_launch

    check_launch(args.tp, "cuda" if args.device.startswith("cuda") else "cpu")


def _messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system is not None else []


def _utf8(text: str, what: str) -> str:
    """`text` as given on the command line; undecodable bytes reach Python as surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} is not valid UTF-8 text; pass UTF-8 (check the terminal's locale)"
        ) from None
    return text


def _generate(args) -> int:
    prompt = _utf8(args.prompt, "the prompt")
    if not prompt:
        raise ValueError(
            'the prompt is empty; pass the text to continue, e.g. generate "Write a haiku"'
        )
    if args.raw and args.system is not None:
        raise ValueError(
            "--system needs the chat template, which --raw turns off; drop one or the other"
        )
    session = Session(args)
    user = [{"role": "user", "content": prompt}]
    ids = session.encode(prompt if args.raw else _messages(args.system) + user)
    session.reply(ids, args.seed)
    session.close()
    return 0


def _chat(args) -> int:
    """One message a line. A bad line or a failed reply prints one error line; the conversation goes on."""
    messages = _load_conversation(args.load) if args.load else _messages(args.system)
    session = Session(args)
    try:
        return _converse(session, messages, args)
    finally:
        session.close()


def _converse(session: Session, messages: list[dict], args) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "chat with the model; /reset starts over, /save FILE keeps the conversation, /exit quits",
            file=sys.stderr,
        )
    turn = 0
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        raw = session.read_line()
        if not raw:
            return 0
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            _error(
                "that line is not valid UTF-8 text and was skipped; the conversation is unchanged"
            )
            continue
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = _messages(args.system)
            continue
        if text == "/save" or text.startswith("/save "):
            _save_conversation(text.removeprefix("/save").strip(), messages)
            continue
        # A seeded chat is reproducible as a whole, while each turn still draws differently.
        seed = None if args.seed is None else args.seed + turn
        try:
            reply = session.reply(
                session.encode([*messages, {"role": "user", "content": text}]), seed
            )
        except ValueError as error:
            _error(f"{error}; the message was not added (/reset starts a shorter conversation)")
            continue
        except RuntimeError as error:
            _error(f"{error}; the message was not added")
            continue
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        turn += 1


def _save_conversation(name: str, messages: list[dict]) -> None:
    """Write the conversation as JSON, atomically: a failed save leaves no half-written file."""
    if not name:
        _error("/save needs a file name, e.g. /save chat.json")
        return
    path = Path(name).expanduser()
    try:
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as f:
            json.dump({"messages": messages}, f, ensure_ascii=False, indent=1)
        os.replace(f.name, path)
    except OSError as error:
        if "f" in locals():
            Path(f.name).unlink(missing_ok=True)
        _error(
            f"could not save to {path}: {error.strerror or error}; the conversation is unchanged"
        )
        return
    print(f"saved {len(messages)} messages to {path}", file=sys.stderr)


def _load_conversation(name: str) -> list[dict]:
    from minqwen.tokenizer import render_chat

    path = Path(name).expanduser()
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))["messages"]
        render_chat(messages)  # checks every role and content
    except OSError as error:
        raise ValueError(f"--load {path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--load {path} is not a conversation saved by /save ({error})") from None
    return messages


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    from minqwen.engine.speculative import DEFAULT_DRAFT_TOKENS
    from minqwen.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES
    from minqwen.quant.weight_only import SCHEMES

    p.add_argument(
        "--model", default="embedded", help="any minqwen.fetch source (default: embedded)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument(
        "--quantize",
        choices=SCHEMES,
        help="store the projections in 8 or 4 bits once loaded (minqwen.quantize); int4 runs its "
        "products in bfloat16",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        help=f"weights per int4 step and zero point (default {DEFAULT_GROUP_SIZE}); needs --quantize int4",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        help="fast: FastQwen2, CUDA graphs on a GPU (default on cuda); eager: the plain loop (default on cpu)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--draft",
        help="speculative decoding (chapter 7): prompt-lookup, or a smaller model of the same family as "
        "any minqwen.fetch source (embedded for --model embedded-1.5b)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        help=f"tokens drafted per round (default {DEFAULT_DRAFT_TOKENS}); needs --draft",
    )
    p.add_argument(
        "--tp",
        type=int,
        help="tensor parallelism (chapter 8): split the model across the N processes that "
        "`torchrun --nproc-per-node N -m minqwen ...` starts, one per GPU (or CPU processes on gloo)",
    )
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
    p.add_argument(
        "--stats",
        action="store_true",
        help="print prefill and decode tok/s after each reply (with --draft, the acceptance too)",
    )


def build_parser() -> argparse.ArgumentParser:
    from minqwen.tools import bench

    parser = Parser(prog="python -m minqwen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="fetch and verify a checkpoint, print its folder")
    p.add_argument(
        "source",
        nargs="?",
        default="embedded",
        help="embedded, embedded-1.5b, random:<size>, a hub id or a folder",
    )
    p.add_argument(
        "--trust",
        action="store_true",
        help="accept a folder that has no SHA256SUMS manifest, unverified",
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
    p.add_argument("--load", help="continue a conversation saved with /save FILE")
    p.set_defaults(run=_chat)
    p = commands.add_parser(
        "bench", help="prefill and decode tok/s of each implementation, beside the roofline"
    )
    bench.add_arguments(p)
    p.set_defaults(run=bench.cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        from minqwen.engine.request import NumericalError
        from minqwen.model.config import ConfigError
        from minqwen.weights import FetchError

        args = build_parser().parse_args(argv)
        if getattr(args, "tp", None) and os.environ.get("RANK", "0") != "0":
            # Every rank runs the model, rank 0 alone speaks: the others' output would repeat it.
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
        try:
            return args.run(args)
        except (FetchError, ConfigError, NumericalError, ValueError, OSError) as error:
            if isinstance(error, BrokenPipeError):
                raise
            _error(str(error))
            return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
