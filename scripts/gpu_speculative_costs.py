"""What speculative decoding's passes cost on a GPU: the numbers chapter 7's cost model needs there.

For each size, bf16, random weights with the real config (speed does not depend on the values), at a context of
`--context` tokens, one pass over n = 1..9 tokens as `SpeculativeDecoder` runs it, its logits' argmax read back:
through the eager model (`CachedModel`), and through the fast engine (`CachedSpans`, one CUDA graph per n). And,
for reference, one decode step of the fast engine's own generate, timed over a whole greedy generation. Medians of `--repeat` runs, each synchronized. One JSON line per size.
Acceptance is not measured here: random weights accept nothing meaningful. Chapter 7 combines these costs with the
acceptance measured on the real weights on the CPU, and labels the result a projection.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from minqwen.engine.fast import CachedSpans, FastQwen2
from minqwen.engine.speculative import CachedModel
from minqwen.tools.bench import load_hf, minqwen_from_hf


def median_ms(run, repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(size: str, context: int, repeat: int) -> dict:
    model = minqwen_from_hf(load_hf(size, "cuda", torch.bfloat16))
    prompt = torch.randint(0, 1000, (context,)).tolist()
    fast = FastQwen2(model)
    passes = {
        "eager_verify_ms": CachedModel(model),
        "fast_verify_ms": CachedSpans(
            fast, fast.capacity_for(context + 16), widths=tuple(range(1, 10))
        ),
    }
    record = {}
    for name, cached in passes.items():
        cached.extend(prompt, last_only=True)

        def verify(n, cached=cached):
            int(cached.extend(prompt[:n]).argmax(dim=-1)[-1])
            cached.rollback(len(prompt))

        record[name] = {n: median_ms(functools.partial(verify, n), repeat) for n in range(1, 10)}
    ids = torch.tensor([prompt], device="cuda")
    plain = dict(do_sample=False, eos_token_id=[], repetition_penalty=1.0)
    fast.generate(ids, 8, **plain)
    new = 128
    total = median_ms(lambda: fast.generate(ids, new, **plain), 3)
    first = median_ms(lambda: fast.generate(ids, 1, **plain), 3)
    return {
        "size": size,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "weights": "random, real config",
        "context": context,
        "date": datetime.date.today().isoformat(),
        **record,
        "fast_step_ms": (total - first) / (new - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B", "7B"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = []
    for size in args.sizes:
        records.append(measure(size, args.context, args.repeat))
        print(json.dumps(records[-1]), flush=True)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
