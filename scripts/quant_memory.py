"""Memory of each weight-only scheme on the CPU: what the format predicts, what the model holds, and the peak.

For each scheme, a fresh Python process loads the embedded model with `Qwen2.from_pretrained(..., quantize=...)`
and decodes 16 tokens. It reports three numbers:
- the bytes the format predicts for the quantized layers: bits per weight x weights / 8;
- the bytes the loaded model's parameters and buffers hold;
- the process's peak resident memory (`ru_maxrss`), which includes Python, torch and, while loading, the float
  weights that `from_pretrained` reads before it quantizes them.
Prints one JSON line per scheme, and appends it to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

SCHEMES = ("float32", "bfloat16", "int8", "int4-g32", "int4-g128")


def measure(source: str, scheme: str) -> dict:
    import torch

    import minqwen
    from minqwen.quant.weight_only import QUANTIZED_LAYERS

    name, _, group = scheme.partition("-g")
    quantize = None if scheme in ("float32", "bfloat16") else name
    dtype = torch.float32 if scheme == "float32" else torch.bfloat16
    model = minqwen.Qwen2.from_pretrained(
        minqwen.fetch(source),
        dtype=dtype,
        quantize=quantize,
        group_size=int(group) if group else None,
    )
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    weights = sum(m.in_features * m.out_features for m in layers)
    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    quantized_held = sum(t.nbytes for m in layers for t in m.buffers())
    # Bits per weight of the format, scales and zero points included: int8 adds a float32 scale per row,
    # int4 a bfloat16 step and zero point per group.
    if quantize == "int8":
        bits = 8 + 32 * sum(m.out_features for m in layers) / weights
    elif quantize == "int4":
        bits = 4 + 32 / int(group)
    else:
        bits = None
    minqwen.generate(model, torch.tensor([[9707, 11, 1879]]), 16, do_sample=False, eos_token_id=[])
    return {
        "model": source,
        "scheme": scheme,
        "quantized_weights": weights,
        "predicted_quantized_bytes": bits * weights / 8 if bits else None,
        "quantized_layer_bytes": quantized_held or None,
        "model_bytes": held,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # the scheme a child process measures
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one)))
        return
    for scheme in SCHEMES:
        child = [sys.executable, __file__, "--model", args.model, "--one", scheme]
        line = subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip()
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line.splitlines()[-1] + "\n")


if __name__ == "__main__":
    main()
