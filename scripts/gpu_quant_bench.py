"""On a GPU: decode speed of the fast engine with bf16, int8 and int4 weights, side by side, and torchao's
weight-only quantization of the same fused weights as the reference library.

Random weights with the real configs, bf16 activations, prompt 128, 128 new tokens, greedy. For each size, every
variant is timed in the same process, one after another, with `minqwen.tools.bench.measure`. One JSON line per
(size, variant, batch) with decode and prefill tok/s, the bytes a decode step streams (every fused weight, the
norms and the head; the embedding's one row and the short cache are left out) and the roofline those bytes
allow at the copy bandwidth measured in the same run. Before timing, the script checks on the GPU what the CPU
tests cannot: int4 values come back out of the CUDA layout, each quantized product agrees with its dequantized
weight, and the fast engine's greedy tokens against the eager loop's on the same quantized model.

`--device cpu` runs a small smoke test of the script itself (the tiny 0.5B-shaped layers, no timing of note).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import minqwen
from minqwen.engine import fast as fast_engine
from minqwen.engine.fast import FastQwen2
from minqwen.quant.int4 import Int4Linear, Int4Weight, pack
from minqwen.quant.int8 import Int8Linear
from minqwen.tools.bench import copy_bandwidth, device_label, load_hf, measure, minqwen_from_hf

GREEDY = dict(do_sample=False, eos_token_id=[])
VARIANTS = ("bf16", "int8", "int4-g128", "int4-g32", "torchao-int8", "torchao-int4-g128")


def streamed_bytes(fast: FastQwen2) -> int:
    """Bytes of every tensor a decode step reads whole: the layers' weights, the final norm and the head."""
    tensors = []
    for item in [*fast.layers, (fast.norm_weight, fast.lm_head_weight)]:
        for part in item:
            tensors.extend(part if isinstance(part, tuple) else [part])
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
    return total


def _nbytes(t: torch.Tensor) -> int:
    """A torchao tensor subclass holds its data in inner tensors: count those."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def with_torchao(fast: FastQwen2, scheme: str) -> FastQwen2:
    """The same engine, its fused weights quantized by torchao's weight-only configs instead of ours."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = (
        Int8WeightOnlyConfig()
        if scheme == "int8"
        else Int4WeightOnlyConfig(
            group_size=128,
            int4_packing_format="tile_packed_to_4d",  # tinygemm: the kernel minqwen's int4 uses
        )
    )

    def quantized(weight: torch.Tensor) -> torch.Tensor:
        holder = torch.nn.Sequential(
            torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        )
        holder[0].weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        quantize_(holder, config)
        return holder[0].weight

    names = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
    fast.layers = [w._replace(**{n: quantized(getattr(w, n)) for n in names}) for w in fast.layers]
    if (
        fast.lm_head_weight is not fast.embedding
    ):  # a tied head stays as it is, as minqwen.quantize leaves it
        fast.lm_head_weight = quantized(fast.lm_head_weight)
    return fast


def gpu_checks(model, device) -> dict:
    """What the CPU tests cannot check: the CUDA int4 layout and each quantized product on the GPU."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (4864, 896), dtype=torch.uint8, generator=generator)
    layout = Int4Weight(pack(values, device), torch.zeros(7, 4864, 2, device=device), 128)
    linear = model.layers[0].mlp.gate_proj
    x = torch.randn(3, linear.in_features, device=device, dtype=torch.bfloat16)
    errors = {}
    for name, layer in (("int8", Int8Linear(linear)), ("int4-g128", Int4Linear(linear, 128))):
        exact = x.double() @ layer.dequantized_weight().double().T
        errors[name] = ((layer(x).double() - exact).abs().max() / exact.abs().max()).item()
    return {
        "int4_values_round_trip": bool(torch.equal(layout.unpacked().cpu(), values)),
        "relative_error": errors,
    }


def greedy_agreement(fast: FastQwen2, model, ids: torch.Tensor, steps: int) -> int:
    """How many greedy tokens the fast engine and the eager loop share before they first part."""
    a = fast.generate(ids, steps, **GREEDY)[0, ids.shape[1] :]
    b = minqwen.generate(model, ids, steps, **GREEDY)[0, ids.shape[1] :]
    return int((a == b).cumprod(0).sum())


def build(base, variant: str):
    """(fast engine, quantized model or None) for one variant of the bf16 model `base`."""
    if variant == "bf16":
        return FastQwen2(base), None
    if variant.startswith("torchao"):
        # torchao's tensors bring their own F.linear; the fast engine's single-row reduction would widen them
        fast_engine.SINGLE_ROW_AS_REDUCTION = False
        return with_torchao(FastQwen2(base), variant.split("-")[1]), None
    scheme, _, group = variant.partition("-g")
    model = minqwen.quantize(copy.deepcopy(base), scheme, group_size=int(group) if group else None)
    return FastQwen2(model), model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5B,1.5B,7B")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch._dynamo.config.recompile_limit = 64
    copy_bw = copy_bandwidth(device)
    common = {
        "device": device_label(device),
        "torch": torch.__version__,
        "copy_bytes_per_s": copy_bw,
        "dtype": "bfloat16",
        "prompt_len": args.prompt,
        "new_tokens": args.new_tokens,
    }
    try:
        import torchao

        common["torchao"] = torchao.__version__
    except ImportError:
        common["torchao"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        base = minqwen_from_hf(load_hf(size, device, dtype))
        checks = gpu_checks(base, device)
        print(size, "checks", checks, flush=True)
        for variant in args.variants.split(","):
            started = time.perf_counter()
            record = {**common, "model": size, "variant": variant, "checks": checks}
            try:
                fast, quantized = build(base, variant)
                record["streamed_bytes"] = streamed_bytes(fast)
                record["roofline_decode_tok_s"] = copy_bw / record["streamed_bytes"]
                ids = torch.randint(0, 150_000, (1, args.prompt), device=device)
                if quantized is not None:
                    record["greedy_agreement_of_32"] = greedy_agreement(fast, quantized, ids, 32)
                for batch in map(int, args.batches.split(",")):
                    ids = torch.randint(0, 150_000, (batch, args.prompt), device=device)
                    run = lambda i, n, f=fast: f.generate(i, n, **GREEDY)  # noqa: E731
                    numbers = measure(run, ids, args.new_tokens, repeats=args.repeats)
                    line = {**record, "batch_size": batch, **numbers}
                    line["seconds_with_compile"] = time.perf_counter() - started
                    with args.out.open("a") as f:
                        f.write(json.dumps(line) + "\n")
                    print(
                        f"{size} {variant} b{batch}: decode {numbers['decode_tok_s']:,.0f} tok/s "
                        f"({numbers['decode_tok_s'] / batch / record['roofline_decode_tok_s']:.0%} of "
                        f"{record['roofline_decode_tok_s']:,.0f} at batch 1 bytes)",
                        flush=True,
                    )
            except (
                Exception
            ) as error:  # a variant that fails (torchao missing, say) is recorded, not fatal
                message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                print(f"{size} {variant}: failed: {message}", flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps({**record, "failed": message}) + "\n")
            finally:
                fast = quantized = None
                torch._dynamo.reset()
                fast_engine.SINGLE_ROW_AS_REDUCTION = True
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del base


if __name__ == "__main__":
    main()
