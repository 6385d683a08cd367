"""On a GPU: chapter 5's hand-written decode kernels (minqwen.engine.decode_kernels), tuned, checked and timed.

Random weights with the real configs, bf16 unless said, batch 1. Three parts, each a JSON line per measurement
after a header with the hardware, the versions and the copy bandwidth:

- `tune`: each kernel at a grid of tiles, run over every layer's weights in turn inside CUDA graphs
  (`triton.testing.do_bench_cudagraph`), as microseconds a layer and bytes of weight read per second; then
  layer 0 with the engine's tiles against the compiled layer, each replayed alone, at a 256-position cache.
- `check`: the fast engine's greedy tokens with the kernels against the eager loop's (`greedy_agreement`), in
  float32 (where they must agree) and bf16 (where they part at near-ties only).
- `decode`: decode tok/s at prompt 128, 128 new tokens: hf-static-compile, the fast engine with the compiled
  layer, and with the kernels, side by side (`minqwen.tools.bench.measure`), with the roofline.

`--blocks` replaces the engine's tiles (`decode_kernels.blocks_for`) for `tune`'s layer line, `check` and
`decode`, as JSON per size, for example '{"0.5B": {"down": [4, 512]}}'. `--device cpu` runs a smoke test of `check` on the CPU, in float32 and
Triton's interpreter (set TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import json
import time
from pathlib import Path

import torch
import transformers

from minqwen.engine import decode_kernels
from minqwen.engine.decode_kernels import Blocks, Tile
from minqwen.engine.fast import FastQwen2, greedy_agreement, rope_cos_sin
from minqwen.tools.bench import (
    _hf_generate,
    _minqwen_fast,
    copy_bandwidth,
    load_hf,
    measure,
    minqwen_from_hf,
    roofline,
)
from minqwen.tools.hardware import hardware_report

GRID = dict(rows=(2, 4, 8, 16, 32), block_k=(256, 512, 1024), warps=(4,))
CACHE = 256


def fast_engine(model, blocks: Blocks | None, **settings) -> FastQwen2:
    """The fast engine with the kernels' tiles `blocks`, or its own (decode_kernels.blocks_for) for None."""
    fast = FastQwen2(model, **settings)
    if blocks is not None:
        fast._single_row_layer = functools.partial(decode_kernels.decode_layer, blocks=blocks)
    return fast


def layer_inputs(fast: FastQwen2, device):
    """A row, its RoPE angles, the mask and a cache for layer 0 at slot 200 of a 256-position cache."""
    c, s = fast.config, fast.shape
    g = torch.Generator(device).manual_seed(0)
    keys = torch.randn(1, s.kv_heads, CACHE, s.head_dim, generator=g, device=device).to(fast.dtype)
    values = torch.randn_like(keys)
    x = torch.randn(1, 1, c.hidden_size, generator=g, device=device).to(fast.dtype)
    slot = torch.tensor([200], device=device)
    cos, sin = rope_cos_sin(fast.inv_freq, slot[:, None], fast.rope_scale, fast.dtype)
    visible = (torch.arange(CACHE, device=device) <= slot)[None, None, None, :]
    return x, cos, sin, visible, slot, keys, values


def timed_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3


def tune(size: str, fast: FastQwen2, out) -> None:
    """Each kernel over every layer's weights in turn, as a decode step reads them: replaying one layer's would
    time a small model's weights from L2, where the step finds them in memory."""
    s = fast.shape
    x, cos, sin, visible, slot, keys, values = layer_inputs(fast, "cuda")
    row = x.reshape(-1)
    q = torch.randn(s.heads * s.head_dim, device="cuda", dtype=fast.dtype)
    act = torch.randn(fast.layers[0].gate_up_weight.shape[0] // 2, device="cuda", dtype=fast.dtype)
    kernels = {
        "qkv": lambda w, b: decode_kernels.qkv(
            row,
            w.input_norm,
            w.qkv_weight,
            w.qkv_bias,
            cos.reshape(-1),
            sin.reshape(-1),
            slot,
            keys,
            values,
            s.eps,
            s.heads,
            b,
        ),
        "o": lambda w, b: decode_kernels.project_add(q, w.o_weight, row, b.o, b.warps),
        "gate_up": lambda w, b: decode_kernels.gate_up(
            row, w.post_norm, w.gate_up_weight, s.eps, b
        ),
        "down": lambda w, b: decode_kernels.project_add(act, w.down_weight, row, b.down, b.warps),
    }
    weights = dict(qkv="qkv_weight", o="o_weight", gate_up="gate_up_weight", down="down_weight")

    def every_layer(run, blocks):
        for w in fast.layers:
            run(w, blocks)

    for (name, run), rows, block_k, warps in itertools.product(
        kernels.items(), GRID["rows"], GRID["block_k"], GRID["warps"]
    ):
        trial = Blocks(warps=warps)._replace(**{name: Tile(rows, block_k)})
        us = timed_us(functools.partial(every_layer, run, trial)) / len(fast.layers)
        weight = getattr(fast.layers[0], weights[name])
        nbytes = weight.numel() * weight.element_size()
        line = dict(
            part="tune",
            size=size,
            kernel=name,
            rows=rows,
            block_k=block_k,
            warps=warps,
            us=us,
            weight_bytes=nbytes,
            bytes_per_s=nbytes / us * 1e6,
        )
        out.write(json.dumps(line) + "\n")
    w = fast.layers[0]
    layers = {
        "compiled": lambda: fast._decode_layer(x, cos, sin, visible, slot, keys, values, w, s),
        "fused": lambda: fast._single_row_layer(x, cos, sin, visible, slot, keys, values, w, s),
    }
    for name, run in layers.items():
        run()
        line = dict(part="layer", size=size, layer=name, us=timed_us(run))
        out.write(json.dumps(line) + "\n")
        print(f"{size} layer {name}: {line['us']:.1f} us", flush=True)
    out.flush()


def check(size: str, model, blocks: Blocks, device, out) -> None:
    ids = torch.randint(
        0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1)
    )
    fast = fast_engine(model, blocks, fused_kernels=True)
    for row in range(3):
        result = greedy_agreement(model, fast, ids[row : row + 1].to(device), 32)[0]
        line = dict(
            part="check",
            size=size,
            dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."),
            prompt=row,
            same=result["same"],
            new_tokens=32,
            gap_ulps=result.get("gap_ulps"),
        )
        out.write(json.dumps(line) + "\n")
        print(f"{size} {line['dtype']} prompt {row}: {result['same']}/32 agree", flush=True)


def decode(size: str, args, blocks: Blocks, bandwidth: float, out) -> None:
    dtype = torch.bfloat16
    hf = load_hf(size, "cuda", dtype)
    config = minqwen_from_hf(hf).config
    ids = torch.randint(
        0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    ).cuda()
    bound = roofline(config, 1, args.prompt, args.new_tokens, "bfloat16", bandwidth, float("inf"))

    def record(variant: str, run) -> None:
        started = time.perf_counter()
        numbers = measure(run, ids, args.new_tokens, repeats=args.repeats)
        line = dict(
            part="decode",
            size=size,
            variant=variant,
            batch=1,
            prompt=args.prompt,
            new_tokens=args.new_tokens,
            decode_tok_s=numbers["decode_tok_s"],
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

    record("hf-static-compile", _hf_generate(hf, static=True))
    model = minqwen_from_hf(hf)
    del hf
    torch._dynamo.reset()
    gc.collect()
    record("compiled-layer", _minqwen_fast(FastQwen2(model, fused_kernels=False)))
    torch.cuda.empty_cache()
    record("fused-kernels", _minqwen_fast(fast_engine(model, blocks, fused_kernels=True)))
    del model
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="tune,check,decode")
    parser.add_argument("--sizes", default="0.5B,1.5B,7B")
    parser.add_argument("--blocks", default="{}")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    parts = args.parts.split(",")
    if args.device == "cpu":
        if not decode_kernels.available(torch.device("cpu")):
            parser.error(
                "--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1"
            )
        parts = ["check"]
    transformers.logging.set_verbosity_error()
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth(args.device)
    per_size = json.loads(args.blocks)
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
            given = per_size.get(size)
            blocks = None if given is None else Blocks(**{k: Tile(*v) for k, v in given.items()})
            if "tune" in parts or "check" in parts:
                # float32, where the tokens must agree, for the smallest model only; it doubles the bytes
                dtypes = [torch.float32] if args.device == "cpu" or size == "0.5B" else []
                dtypes += [torch.bfloat16] if args.device == "cuda" else []
                for dtype in dtypes:
                    model = minqwen_from_hf(load_hf(size, args.device, dtype))
                    if "tune" in parts and dtype == torch.bfloat16:
                        tune(size, fast_engine(model, blocks, fused_kernels=False), out)
                    if "check" in parts:
                        check(size, model, blocks, args.device, out)
                    del model
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            if "decode" in parts:
                decode(size, args, blocks, bandwidth, out)


if __name__ == "__main__":
    main()
