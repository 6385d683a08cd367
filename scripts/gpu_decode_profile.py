"""On a GPU: where one decode step of the fast engine spends its time, kernel by kernel.

Random weights with the real configs, bf16, batch 1. For each size and context length, one JSON line with:

- the step's time, measured as (generate 1 + S tokens - generate 1 token) / S, in each of the modes: `graphs`
  (compiled and captured, attention as two matrix products and a softmax), `split` (the same, attention by the
  split kernel of minqwen.engine.decode_attention) and `eager` (the fused step functions called uncompiled);
- the largest error of each attention against float64 on random queries and cache of the model's layout;
- the roofline for that step: the bytes it must read (weights, plus the cache up to the context) over the
  measured copy bandwidth;
- for each graph mode, every kernel of one replay from the PyTorch profiler (name, start and duration in
  microseconds, relative to the replay's first kernel), grouped by the graph launch that ran it: `kernels`
  for `graphs`, `split_kernels` for `split`.

`--device cpu` runs a small smoke test of the script itself (no graphs, no profile).
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

from minqwen.engine.decode_attention import split_attention
from minqwen.engine.fast import FastQwen2, matmul_attention
from minqwen.model.sizes import kv_cache_bytes_per_token, weight_bytes_per_step
from minqwen.tools.bench import copy_bandwidth, load_hf, minqwen_from_hf
from minqwen.tools.hardware import hardware_report

GREEDY = dict(do_sample=False, eos_token_id=[])
MODES = {
    "graphs": dict(use_graphs=True, split_attention=False, fused_kernels=False),
    "split": dict(use_graphs=True, split_attention=True, fused_kernels=False),
    "fused": dict(use_graphs=True, split_attention=True, fused_kernels=True),
    "eager": dict(use_graphs=False, split_attention=False, fused_kernels=False),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate_seconds(fast: FastQwen2, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(fast.device.type)
        start = time.perf_counter()
        fast.generate(ids, new_tokens, **GREEDY)
        sync(fast.device.type)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_ms(fast: FastQwen2, ids: torch.Tensor, steps: int, repeats: int) -> float:
    """Milliseconds per decode step: the prefill and the first token cancel out in the difference."""
    fast.generate(ids, 1 + steps, **GREEDY)
    longer = generate_seconds(fast, ids, 1 + steps, repeats)
    shorter = generate_seconds(fast, ids, 1, repeats)
    return (longer - shorter) / steps * 1e3


def replay_kernels(fast: FastQwen2, ids: torch.Tensor, steps: int) -> list[dict]:
    """The kernels of one graph replay (the median-length one of `steps`), as the profiler saw them."""
    trace = Path("/tmp/decode_trace.json")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fast.generate(ids, 1 + steps, **GREEDY)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    launches = {
        e["args"]["correlation"]
        for e in events
        if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"
    }
    by_launch: dict[int, list[dict]] = {}
    for e in events:
        if e.get("cat") == "kernel" and e["args"].get("correlation") in launches:
            by_launch.setdefault(e["args"]["correlation"], []).append(e)
    if not by_launch:
        raise SystemExit("the profiler recorded no kernels inside graph replays")
    replays = sorted(
        by_launch.values(),
        key=lambda ks: max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks),
    )
    kernels = sorted(replays[len(replays) // 2], key=lambda k: k["ts"])
    start = kernels[0]["ts"]
    return [
        {"name": k["name"], "start_us": round(k["ts"] - start, 3), "dur_us": round(k["dur"], 3)}
        for k in kernels
    ]


def attention_errors(config, context: int, device: str, dtype: torch.dtype) -> dict:
    """Largest |error| of each attention against float64, on random q and cache with the last eighth unseen."""
    g = torch.Generator().manual_seed(1)
    groups = config.num_attention_heads // config.num_key_value_heads
    shape = (1, config.num_key_value_heads, context, config.head_dim)
    q = torch.randn(1, config.num_key_value_heads, groups, config.head_dim, generator=g)
    keys, values = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    visible = torch.arange(context) < context - context // 8
    scale = config.head_dim**-0.5
    exact = (q.double() @ keys.double().transpose(-1, -2) * scale).masked_fill(
        ~visible, float("-inf")
    )
    exact = exact.softmax(-1) @ values.double()
    q, keys, values = (t.to(device, dtype) for t in (q, keys, values))
    visible = visible.to(device)
    outputs = {
        "matmul": matmul_attention(q, keys, values, visible[None, None, None], scale),
        "split": split_attention(q, keys, values, visible[None], scale),
    }
    return {
        f"{name}_max_error": (o.double().cpu() - exact).abs().max().item()
        for name, o in outputs.items()
    }


def run(size: str, contexts: list[int], args, out, bandwidth: float) -> None:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = minqwen_from_hf(load_hf(size, device, dtype))
    config = model.config
    name = str(dtype).removeprefix("torch.")
    for context in contexts:
        prompt = context - args.steps // 2
        ids = torch.randint(
            0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)
        )
        ids = ids.to(device)
        read = weight_bytes_per_step(config, name) + context * kv_cache_bytes_per_token(
            config, name
        )
        line = dict(
            size=size,
            dtype=name,
            batch=1,
            context=context,
            prompt=prompt,
            steps=args.steps,
            bytes_per_step=read,
            copy_bytes_per_s=bandwidth,
            roofline_ms=read / bandwidth * 1e3,
        )
        modes = args.modes if device == "cuda" else ["eager"]
        if device == "cuda":
            line.update(attention_errors(config, context, device, dtype))
        for mode in modes:
            fast = FastQwen2(model, **MODES[mode])
            line[f"{mode}_step_ms"] = step_ms(fast, ids, args.steps, args.repeats)
            if fast.use_graphs:
                key = "kernels" if mode == "graphs" else f"{mode}_kernels"
                line[key] = replay_kernels(fast, ids, args.steps)
            del fast
            if device == "cuda":
                torch.cuda.empty_cache()
        out.write(json.dumps(line) + "\n")
        out.flush()
        summary = ", ".join(f"{m} {line[f'{m}_step_ms']:.3f} ms" for m in modes)
        kernels = f", {len(line['kernels'])} kernels" if "kernels" in line else ""
        print(
            f"{size} context {context}: {summary}, roofline {line['roofline_ms']:.3f} ms{kernels}",
            flush=True,
        )
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="0.5B,7B")
    parser.add_argument("--contexts", default="256,4096,16384")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="graphs,split,eager")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {sorted(MODES)}")
    contexts = [int(c) for c in args.contexts.split(",")]
    # Every (size, context, mode) compiles the decode layer anew: more variants than dynamo's default of 8.
    torch._dynamo.config.recompile_limit = 64
    report = hardware_report()
    bandwidth = copy_bandwidth(args.device)
    with args.out.open("w") as out:
        out.write(
            json.dumps(
                {"header": True, "hardware": dataclasses.asdict(report), "torch": torch.__version__}
            )
            + "\n"
        )
        for size in args.sizes.split(","):
            run(size, contexts, args, out, bandwidth)


if __name__ == "__main__":
    main()
