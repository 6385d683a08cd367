"""On a GPU: time variants of minqwen-fast's decode step, to choose what minqwen.engine.fast ships.

Each variant toggles one choice: single-row projections as library matrix products or as compiled
multiply-and-sum reductions (`minqwen.engine.fast.SINGLE_ROW_AS_REDUCTION`), and inductor's coordinate-descent tuning of
its kernels. Decode tok/s of each cell via minqwen.tools.bench.measure; the first call's time includes compilation.
Earlier variants (SDPA attention, the whole step compiled) are recorded in book/data/bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from minqwen.engine import fast as fastmod
from minqwen.tools.bench import load_hf, measure, minqwen_from_hf

VARIANTS = {  # name: (single row as reduction, coordinate-descent tuning)
    "matmul": (False, False),
    "reduction": (True, False),
    "matmul-cdt": (False, True),
    "reduction-cdt": (True, True),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", default="0.5B:1:128,0.5B:4:128,7B:1:128")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--deadline", type=float, default=400)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    start = time.perf_counter()
    cells = [c.split(":") for c in args.cells.split(",")]
    for size in dict.fromkeys(c[0] for c in cells):
        model = minqwen_from_hf(load_hf(size, "cuda", torch.bfloat16))
        for name in args.variants.split(","):
            fastmod.SINGLE_ROW_AS_REDUCTION, torch._inductor.config.coordinate_descent_tuning = (
                VARIANTS[name]
            )
            torch._dynamo.reset()
            gc.collect()
            fast = fastmod.FastQwen2(model)
            for _, batch, prompt in (c for c in cells if c[0] == size):
                if time.perf_counter() - start > args.deadline:
                    print("deadline", flush=True)
                    return
                ids = torch.randint(0, 150_000, (int(batch), int(prompt)), device="cuda")
                t = time.perf_counter()
                fast.generate(ids, 8, eos_token_id=[])
                compile_s = time.perf_counter() - t
                r = measure(
                    lambda i, n, fast=fast: fast.generate(i, n, eos_token_id=[]),
                    ids,
                    128,
                    repeats=5,
                    warmup=1,
                )
                print(
                    f"{size} b{batch} p{prompt} {name}: decode {r['decode_tok_s']:.1f} tok/s (first call {compile_s:.0f} s)",
                    flush=True,
                )
            del fast
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
