"""On a GPU: chapter 5's waterfall. Decode tok/s of each step from the eager loop to today's fast engine, in one run.

Random weights with the real configs, bf16, batch 1, prompt 128, 128 new tokens (as `python -m minqwen bench`, whose
`measure` times every variant). Each variant adds one thing to the one before it:

- `hf-eager`: transformers' `generate`, dynamic cache (the starting point);
- `minqwen-eager`: the book's loop and cache (chapter 4);
- `static-cache`: fused projections, a static cache and no host sync per token; every kernel launched from Python;
- `compiled`: the same step compiled (projections as library matrix products), still called from Python;
- `graphs`: the compiled step captured as one CUDA graph per token;
- `reductions`: single-row projections as compiled multiply-and-sum reductions, which absorb the pointwise work;
- `split-attention`: attention by the split kernel of minqwen.engine.decode_attention;
- `fused-kernels`: the layer as the six hand-written kernels of minqwen.engine.decode_kernels (the engine's
  default at batch 1).

`hf-static-compile` (transformers' static cache, compiled) is measured in the same run as the reference line.
One JSON line per (size, variant) after a header with the hardware, the versions and the copy bandwidth.
`measure_s` is the variant's wall time in this script, compilation and capture included.

`--device cpu` runs a smoke test of the script itself: float32, and only the variants that run without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
import transformers

from minqwen.engine import fast as fast_engine
from minqwen.engine.fast import FastQwen2
from minqwen.tools.bench import (
    _hf_generate,
    _minqwen_eager,
    _minqwen_fast,
    copy_bandwidth,
    load_hf,
    measure,
    minqwen_from_hf,
    roofline,
)
from minqwen.tools.hardware import hardware_report


class CompiledWithoutGraphs(FastQwen2):
    """The compiled step, called from Python at every token instead of replayed as a captured graph."""

    def _replay(self, state, sampling) -> None:
        self._step(state, sampling)


# name: (engine class, keyword arguments, single-row products as reductions); the first runs without CUDA
FAST_VARIANTS = {
    "static-cache": (FastQwen2, dict(use_graphs=False, split_attention=False), False),
    "compiled": (CompiledWithoutGraphs, dict(split_attention=False), False),
    "graphs": (FastQwen2, dict(split_attention=False), False),
    "reductions": (FastQwen2, dict(split_attention=False), True),
    "split-attention": (FastQwen2, dict(split_attention=True, fused_kernels=False), True),
    "fused-kernels": (FastQwen2, dict(split_attention=True, fused_kernels=True), True),
}


def run_size(size: str, args, out, bandwidth: float) -> None:
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    hf = load_hf(size, args.device, dtype)
    config = minqwen_from_hf(hf).config
    ids = torch.randint(
        0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(args.device)
    bound = roofline(config, 1, args.prompt, args.new_tokens, dtype_name, bandwidth, float("inf"))

    def record(variant: str, run) -> None:
        started = time.perf_counter()
        numbers = measure(run, ids, args.new_tokens, repeats=args.repeats)
        line = dict(
            size=size,
            variant=variant,
            dtype=dtype_name,
            batch=1,
            prompt=args.prompt,
            new_tokens=args.new_tokens,
            decode_tok_s=numbers["decode_tok_s"],
            prefill_tok_s=numbers["prefill_tok_s"],
            roofline_decode_tok_s=bound["decode_tok_s"],
            measure_s=time.perf_counter() - started,
        )
        out.write(json.dumps(line) + "\n")
        out.flush()
        print(
            f"{size} {variant}: {line['decode_tok_s']:,.1f} tok/s "
            f"({line['decode_tok_s'] / bound['decode_tok_s']:.0%} of the roofline)",
            flush=True,
        )

    record("hf-eager", _hf_generate(hf, static=False))
    if cuda:
        record("hf-static-compile", _hf_generate(hf, static=True))
    model = minqwen_from_hf(hf)
    del hf
    torch._dynamo.reset()  # transformers' compiled forward holds the HF model's graphs
    gc.collect()
    record("minqwen-eager", _minqwen_eager(model))
    variants = FAST_VARIANTS if cuda else dict(list(FAST_VARIANTS.items())[:1])
    for variant, (engine, settings, as_reduction) in variants.items():
        fast_engine.SINGLE_ROW_AS_REDUCTION = as_reduction
        record(variant, _minqwen_fast(engine(model, **settings)))
        if cuda:
            torch.cuda.empty_cache()
    fast_engine.SINGLE_ROW_AS_REDUCTION = True
    del model
    torch._dynamo.reset()
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="0.5B,7B")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth(args.device)
    with args.out.open("w") as out:
        header = {
            "header": True,
            "hardware": dataclasses.asdict(hardware_report()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "copy_bytes_per_s": bandwidth,
        }
        out.write(json.dumps(header) + "\n")
        for size in args.sizes.split(","):
            run_size(size, args, out, bandwidth)


if __name__ == "__main__":
    main()
