"""On a GPU: the fast engine's prefill step by step, beside HF eager and the FLOP bound, and a long prompt in chunks.

Random weights with the real configs, bf16, batch 1, greedy. Every rate is prompt tokens over the median time of
`generate(ids, 1)` (the prefill and one sampled token, as `python -m minqwen bench` counts it), each variant timed
in the same process, one after another. JSON lines:

- `header`: the card, torch, and the copy bandwidth and bf16 matrix-product rate measured here;
- `prefill`: one per (size, variant) at `--prompt` tokens, with the FLOP bound (`prefill_flops` at the measured
  matrix rate). The variants add one change each, the last being the engine as it ships:
  `hf-eager` (transformers' own `generate`), `copies` (uncompiled, each kv head copied per query head, the
  engine before chapter 5's prefill page), `gqa` (uncompiled, kv heads shared inside SDPA), `compiled` (the
  work around attention compiled) and `graph` (the whole prefill one CUDA graph);
- `profile`: every kernel of one prefill, for `compiled` and `graph`, summed by class (matrix products,
  attention, compiled pointwise, other), with the span from the first kernel's start to the last one's end;
- `long`: a `--long` token prompt prefilled `chunk` tokens at a time, for each `--chunks` (a chunk as long as
  the prompt runs as one graph), and by HF eager: tok/s, and the peak memory above the weights (minqwen's
  includes its KV cache, `cache_bytes`);
- `check`: the fast engine's greedy tokens against the eager loop's (`greedy_agreement`), with the prefill as
  one graph and in chunks, on one prompt and on a left-padded batch.

`--device cpu` runs a small smoke test of the script itself (no compilation, no profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minqwen.engine import fast as fast_engine
from minqwen.engine.fast import FastQwen2, greedy_agreement
from minqwen.model.layers import attend
from minqwen.model.sizes import kv_cache_bytes_per_token, prefill_flops
from minqwen.tools.bench import (
    _hf_generate,
    copy_bandwidth,
    load_hf,
    matmul_rate,
    minqwen_from_hf,
)
from minqwen.tools.hardware import hardware_report

GREEDY = dict(do_sample=False, eos_token_id=[])
VARIANTS = ("hf-eager", "copies", "gqa", "compiled", "graph")


class ChunkedOnly(FastQwen2):
    """The engine with every prompt prefilled in chunks, uncaptured, however short."""

    def _prefill_graph(self, state, prompt, left_padded):
        engine = self

        class Chunks:
            def run(self, input_ids, positions, attention_mask):
                return engine._prefill_chunks(
                    state, input_ids, positions, attention_mask, left_padded
                )

        return Chunks()


def attention_with_copies(q, keys, values, mask):
    """The eager model's `attend` (kv heads copied per query head), with a later chunk's causal mask spelt out."""
    seq, end = q.shape[2], keys.shape[2]
    if mask is None and seq != end:
        mask = (
            torch.arange(end, device=q.device)
            <= torch.arange(end - seq, end, device=q.device)[:, None]
        )
    return attend(q, keys, values, mask)


def record(out, line: dict, message: str) -> None:
    """One JSON line of results, written at once, and a line for the reader of the run's output."""
    out.write(json.dumps(line) + "\n")
    out.flush()
    print(message, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(run, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_runner(model, variant: str, device):
    """`run(ids)` for one variant: HF's generate, or the fast engine with the prefill of that step."""
    if variant == "hf-eager":
        hf_run = _hf_generate(model.hf, static=False)
        return lambda ids: hf_run(ids, 1)
    engine = FastQwen2 if variant == "graph" else ChunkedOnly
    fast = engine(model, use_graphs=torch.device(device).type == "cuda")
    if variant in ("copies", "gqa"):
        fast._prefill_qkv, fast._prefill_finish = fast_engine.prefill_qkv, fast_engine._finish

    def run(ids):
        original = fast_engine.prefill_attention
        if variant == "copies":
            fast_engine.prefill_attention = attention_with_copies
        try:
            return fast.generate(ids, 1, **GREEDY)
        finally:
            fast_engine.prefill_attention = original

    run.fast = fast
    return run


def kernel_classes(run, ids) -> dict:
    """GPU time of one call by kernel class, in microseconds, and the span the kernels cover."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(ids)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    classes = {"matmul": 0.0, "attention": 0.0, "compiled": 0.0, "other": 0.0}
    for e in kernels:
        name = e.name.lower()
        if "flash" in name or "fmha" in name or "attention" in name:
            kind = "attention"
        elif any(s in name for s in ("gemm", "cutlass", "nvjet", "sm90", "cublas", "matmul")):
            kind = "matmul"
        elif "triton" in name:
            kind = "compiled"
        else:
            kind = "other"
        classes[kind] += e.device_time
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    return {
        "kernels": len(kernels),
        "busy_us": round(sum(classes.values()), 1),
        "span_us": round(end - start, 1),
        **{f"{k}_us": round(v, 1) for k, v in classes.items()},
    }


def check(model, fast: FastQwen2, size: str, out) -> None:
    """Greedy agreement with the eager loop, the prefill captured and chunked, one prompt and a padded batch."""
    g = torch.Generator().manual_seed(1)
    device = fast.device
    one = torch.randint(0, model.config.vocab_size, (1, 300), generator=g).to(device)
    batch = torch.randint(0, model.config.vocab_size, (3, 300), generator=g).to(device)
    mask = torch.ones_like(batch)
    mask[1, :50], mask[2, :180] = 0, 0
    chunked = ChunkedOnly(model, use_graphs=fast.use_graphs, prefill_chunk=64)
    for name, engine in (("graph", fast), ("chunks of 64", chunked)):
        for ids, attention_mask in ((one, None), (batch, mask)):
            rows = greedy_agreement(model, engine, ids, 16, attention_mask=attention_mask)
            line = dict(kind="check", size=size, prefill=name, batch=ids.shape[0], rows=rows)
            summary = ", ".join(
                f"{r['same']}/16" + (f" (gap {r['gap_ulps']:.1f} ulps)" if "gap_ulps" in r else "")
                for r in rows
            )
            record(out, line, f"{size} check, prefill {name}, batch {ids.shape[0]}: {summary}")


def run_size(size: str, args, out, rate: float) -> None:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = load_hf(size, device, dtype)
    model = minqwen_from_hf(hf)
    model.hf = hf
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g).to(device)
    bound = args.prompt / (prefill_flops(model.config, 1, args.prompt) / rate)
    runners = {}
    for variant in VARIANTS:
        runners[variant] = run = engine_runner(model, variant, device)
        timed(lambda run=run: run(ids), args.warmup, device)
        seconds = timed(lambda run=run: run(ids), args.repeats, device)
        line = dict(
            kind="prefill",
            size=size,
            prompt=args.prompt,
            variant=variant,
            tok_s=args.prompt / seconds,
            flop_bound_tok_s=bound,
        )
        record(
            out,
            line,
            f"{size} prompt {args.prompt} {variant}: {line['tok_s']:,.0f} tok/s "
            f"({line['tok_s'] / bound:.0%} of the FLOP bound {bound:,.0f})",
        )
    if device == "cuda":
        for variant in ("compiled", "graph"):
            line = dict(kind="profile", size=size, prompt=args.prompt, variant=variant)
            line.update(kernel_classes(runners[variant], ids))
            record(out, line, f"{size} profile: {line}")
    for name in ("copies", "gqa", "compiled"):
        del runners[name]
    check(model, runners["graph"].fast, size, out)
    long_ids = torch.randint(0, model.config.vocab_size, (1, args.long), generator=g).to(device)
    fast = runners["graph"].fast
    cases = [("minqwen", c) for c in args.chunks] + [("hf-eager", None)]
    for impl, chunk in cases:
        fast._states.clear()  # its caches and graphs go: each case allocates its own
        sync(device)
        if device == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if impl == "minqwen":
            fast.prefill_chunk = chunk
            run = runners["graph"]
        else:
            run = runners["hf-eager"]
        run(long_ids)
        seconds = timed(lambda run=run: run(long_ids), args.long_repeats, device)
        line = dict(
            kind="long",
            size=size,
            prompt=args.long,
            impl=impl,
            chunk=chunk,
            tok_s=args.long / seconds,
        )
        if impl == "minqwen":
            capacity = fast.capacity_for(args.long + 1)
            line["cache_bytes"] = capacity * kv_cache_bytes_per_token(model.config, "bfloat16")
        if device == "cuda":
            line.update(
                before_bytes=before, peak_above_bytes=torch.cuda.max_memory_allocated() - before
            )
            line.update(kernel_classes(run, long_ids))
        record(
            out,
            line,
            f"{size} prompt {args.long} {impl} chunk {chunk}: {line['tok_s']:,.0f} tok/s, "
            f"peak above {line.get('peak_above_bytes', 0) / 2**20:,.0f} MiB",
        )
    del runners, fast, model, hf
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="0.5B,7B")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--long", type=int, default=30000)
    parser.add_argument("--chunks", default="1024,2048,4096,8192,30000")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--long-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    args.chunks = [int(c) for c in args.chunks.split(",")]
    bandwidth = copy_bandwidth(args.device)
    rate = matmul_rate(args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    with args.out.open("w") as out:
        header = dict(
            header=True,
            hardware=dataclasses.asdict(hardware_report()),
            torch=torch.__version__,
            copy_bytes_per_s=bandwidth,
            matmul_flops_per_s=rate,
        )
        out.write(json.dumps(header) + "\n")
        print(f"copy {bandwidth / 1e9:,.0f} GB/s, matmul {rate / 1e12:,.0f} TFLOP/s", flush=True)
        for size in args.sizes.split(","):
            run_size(size, args, out, rate)


if __name__ == "__main__":
    main()
