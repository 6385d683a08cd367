"""On a GPU: does minqwen-fast pick the same greedy tokens as minqwen-eager? (random weights, real configs)

Prints, for each size and dtype, how many of the first new tokens agree on each prompt and, where they part, the
gap between the two choices in the eager model's logits, in units of the dtype's rounding step. Writes the rows
as JSON lines to the path given by --out. Prompts are the golden prompts when book/data/golden holds any, else
three fixed ones, run through the chat template with the bundled tokenizer, as one left-padded batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from minqwen.bench import load_hf, minqwen_from_hf
from minqwen.fast import FastQwen2, greedy_agreement

ROOT = Path(__file__).resolve().parents[1]
FALLBACK_PROMPTS = [
    "Write a Python function that returns the nth Fibonacci number.",
    "What is a KV cache?",
    "Explain binary search in two sentences.",
]


def prompts() -> list[str]:
    golden = [
        json.loads(p.read_text())
        for p in sorted((ROOT / "book" / "data" / "golden").glob("*.json"))
    ]
    found = [g["prompt"] for g in golden if isinstance(g.get("prompt"), str)]
    return found or FALLBACK_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="0.5B:bfloat16,0.5B:float32,7B:bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "minqwen" / "assets" / "qwen2.5-tokenizer")
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts()
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
    with open(args.out, "a") as out:
        for case in args.cases.split(","):
            size, dtype = case.split(":")
            start = time.perf_counter()
            model = minqwen_from_hf(load_hf(size, "cuda", getattr(torch, dtype)))
            fast = FastQwen2(model)
            rows = greedy_agreement(model, fast, ids, args.new_tokens, attention_mask=mask)
            for r in rows:
                r.update(size=size, dtype=dtype, device=torch.cuda.get_device_name())
                out.write(json.dumps(r) + "\n")
                part = (
                    f", then gap {r['gap']:.4g} = {r['gap_ulps']:.2f} rounding steps"
                    if "gap" in r
                    else ""
                )
                print(
                    f"{size} {dtype} row {r['row']}: {r['same']}/{args.new_tokens} tokens agree{part}",
                    flush=True,
                )
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            del model, fast
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
