"""Command line: `python -m minqwen {fetch,info}`."""

from __future__ import annotations

import argparse
import sys

from .hardware import HEADROOM, hardware, memory_estimate, recommend_size
from .sizes import SIZES
from .weights import FetchError, fetch

GIB = 1 << 30


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
    print(f"\nlargest Qwen2.5 size for {report.accelerator_bytes / GIB:.1f} GiB of {where} "
          f"(context {args.context}, batch {args.batch}, {HEADROOM:.0%} headroom):")  # fmt: skip
    for dtype in ("bfloat16", "float32"):
        best = recommend_size(report.accelerator_bytes, dtype, args.context, args.batch)
        need = ", ".join(f"{s} {memory_estimate(s, dtype, args.context, args.batch)['total'] / GIB:.1f}" for s in SIZES)
        print(f"  {dtype:9} -> {best or 'none fits'}   (GiB needed: {need})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minqwen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("fetch", help="fetch and verify a checkpoint, print its folder")
    p.add_argument("source", nargs="?", default="embedded",
                   help="embedded, embedded-1.5b, random:<size>, a hub id or a folder")  # fmt: skip
    p.set_defaults(run=_fetch)
    p = commands.add_parser("info", help="hardware report and the largest size that fits")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FetchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
