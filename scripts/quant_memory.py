"""Memory of each weight-only scheme on the CPU: what the format predicts, what the model holds, and the peak.

For each scheme, a fresh Python process loads the embedded model with `Qwen2.from_pretrained(..., quantize=...)`
and decodes 16 tokens. It reports three numbers:
- the bytes the format predicts for the quantized layers: bits per weight x weights / 8;
- the bytes the loaded model's parameters and buffers hold;
- the process's peak resident memory (`ru_maxrss`), which includes Python, torch and, while loading, the pages
  of the checkpoint file that safetensors maps into memory: clean file pages, which the kernel can drop again;
- the peak of its anonymous resident memory (`RssAnon` in /proc/self/status, sampled every 2 ms by a thread),
  the memory a load really needs: Python, torch, the model and whatever float weights are alive at once. The
  child runs with `MALLOC_MMAP_THRESHOLD_` fixed at 128 kB, so that a freed tensor goes back to the system rather
  than staying in the C allocator's heap, where it would still count.
Prints one JSON line per scheme, and appends it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

SCHEMES = ("float32", "bfloat16", "int8", "int4-g32", "int4-g128")


class AnonymousPeak:
    """The largest RssAnon seen while the `with` block runs, sampled from /proc/self/status."""

    def __enter__(self):
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, anonymous_bytes())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, anonymous_bytes())


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon in /proc/self/status: this measurement needs Linux")


def measure(source: str, scheme: str) -> dict:
    import torch

    import minqwen
    from minqwen.quant.weight_only import QUANTIZED_LAYERS, format_bits

    name, _, group = scheme.partition("-g")
    quantize = None if scheme in ("float32", "bfloat16") else name
    dtype = torch.float32 if scheme == "float32" else torch.bfloat16
    path = minqwen.fetch(source)
    with AnonymousPeak() as anonymous:
        model = minqwen.Qwen2.from_pretrained(
            path, dtype=dtype, quantize=quantize, group_size=int(group) if group else None
        )
        minqwen.generate(
            model, torch.tensor([[9707, 11, 1879]]), 16, do_sample=False, eos_token_id=[]
        )
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    weights = sum(m.in_features * m.out_features for m in layers)
    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    quantized_held = sum(t.nbytes for m in layers for t in m.buffers())
    bits = format_bits(quantize, int(group) if group else None, layers) if quantize else None
    return {
        "model": source,
        "scheme": scheme,
        "quantized_weights": weights,
        "predicted_quantized_bytes": bits * weights / 8 if bits else None,
        "quantized_layer_bytes": quantized_held or None,
        "model_bytes": held,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anonymous_bytes": anonymous.peak,
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--label", default="", help="recorded in every line: which loader the run measured"
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # the scheme a child process measures
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one)))
        return
    for scheme in SCHEMES:
        child = [sys.executable, __file__, "--model", args.model, "--one", scheme]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(child, check=True, capture_output=True, text=True, env=env)
        line = json.dumps({"label": args.label, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
