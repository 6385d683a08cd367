"""Speculative decoding on a GPU with the book's real weights, through the fast engine.

The GPU machine has no network, so the two embedded GGUF files travel to it in pieces (book/data/gpu-runs.md);
this script reads them with transformers, in bfloat16, and wraps the weights in minqwen's model and fast engine.
For each prompt of `speculative_bench.py` (the CPU run), side by side in one process: the 1.5B's own `generate`
(CUDA graphs), then `SpeculativeDecoder` with the fast 1.5B as the target and each drafter (prompt lookup, and
the fast 0.5B). Decode speed is (new tokens - 1) over the time after the first token: each setting runs 96 new
tokens and 1 new token, medians of `--repeat` runs, and the difference is the decode time. Greedy with the
checkpoint's repetition penalty (1.05), as on the CPU. One JSON line per (prompt, setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from minqwen.engine.fast import FastQwen2
from minqwen.engine.speculative import PromptLookup, SpeculativeDecoder
from minqwen.tokenizer import BPETokenizer, render_chat
from minqwen.tools.bench import minqwen_from_hf
from minqwen.weights import ASSETS

sys.path.insert(0, str(Path(__file__).parent))
from speculative_bench import PROMPTS  # noqa: E402

SETTINGS = dict(do_sample=False, repetition_penalty=1.05, eos_token_id=[151645, 151643])
TIMED = [("none", 0), ("prompt-lookup", 4), ("prompt-lookup", 8), ("draft-0.5B", 4)]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script out


def load(folder: Path, name: str):
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    return minqwen_from_hf(hf.to(DEVICE).eval())


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def seconds(run, repeat: int) -> tuple[float, torch.Tensor]:
    """The median seconds of `run()`, and its last result."""
    times = []
    for _ in range(repeat):
        synchronize()
        started = time.perf_counter()
        out = run()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    target = FastQwen2(load(args.gguf_dir, "Qwen2.5-Coder-1.5B-Instruct.gguf"))
    draft = FastQwen2(load(args.gguf_dir, "Qwen2.5-Coder-0.5B-Instruct.gguf"))
    tokenizer = BPETokenizer.from_file(ASSETS)
    engines = {"none": None, "prompt-lookup": PromptLookup(), "draft-0.5B": draft}
    out = args.out.open("w")
    for category, name, text in PROMPTS:
        chat = render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(chat)], device=DEVICE)
        reference = None
        for drafter, k in TIMED:
            engine = (
                target
                if k == 0
                else SpeculativeDecoder(target, engines[drafter], num_draft_tokens=k)
            )
            engine.generate(ids, args.max_new_tokens, **SETTINGS)  # captures and compiles
            first, _ = seconds(partial(engine.generate, ids, 1, **SETTINGS), args.repeat)
            total, tokens = seconds(
                partial(engine.generate, ids, args.max_new_tokens, **SETTINGS), args.repeat
            )
            new = tokens[0, ids.shape[1] :].tolist()
            reference = new if reference is None else reference
            agree = next((i for i, (a, b) in enumerate(zip(new, reference)) if a != b), len(new))
            record = {
                "category": category,
                "name": name,
                "drafter": drafter,
                "k": k,
                "prompt_tokens": ids.shape[1],
                "new_tokens": len(new),
                "decode_tok_s": (len(new) - 1) / (total - first),
                "agrees_with_target_for": agree,
                "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                "torch": torch.__version__,
                "dtype": "bfloat16",
                "weights": "real (the embedded GGUF files, dequantized)",
                "date": datetime.date.today().isoformat(),
            }
            if k:
                stats = engine.stats
                record.update(rounds=stats.rounds, drafted=stats.drafted, accepted=stats.accepted)
            print(json.dumps(record), flush=True)
            out.write(json.dumps(record) + "\n")
    out.close()


if __name__ == "__main__":
    main()
