"""Speculative decoding on the book's real weights, on this machine's CPU: acceptance, costs and speed.

The target is the embedded Qwen2.5-Coder-1.5B-Instruct, float32; the drafters are the embedded 0.5B and prompt
lookup. For each prompt (two code-editing, two code, two chat; the edits ask for a rename across a function of
Python's own standard library, so the answer repeats the prompt), in one process:

- the target alone decodes greedily (the reference tokens, and the baseline speed);
- `SpeculativeDecoder` decodes the same prompt with each drafter, and its tokens are checked equal to the
  reference;
- acceptance for every draft length 1-8 is replayed from the reference (`minqwen.tools.acceptance`), and the
  replay is checked against the real runs' rounds.

Then the costs the cost model needs: one target pass over 1-9 tokens, and one draft step, at the prompt's length,
medians of repeated runs. One JSON line per record; chapter 7 reads them.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import functools
import inspect
import json
import os
import platform
import statistics
import textwrap
import time
from pathlib import Path

import torch

import minqwen
from minqwen.engine.sampling import SamplingConfig
from minqwen.engine.speculative import CachedModel, PromptLookup, SpeculativeDecoder
from minqwen.tools.acceptance import draft_hits, replay_rounds

DRAFT_LENGTHS = range(1, 9)
RENAME = "Rename {old} to {new} everywhere in this function, and return the whole function.\n\n```python\n{src}```"
PROMPTS = [
    (
        "edit",
        "rename in difflib.get_close_matches",
        RENAME.format(
            old="the parameter `possibilities`",
            new="`candidates`",
            src=inspect.getsource(difflib.get_close_matches),
        ),
    ),
    (
        "edit",
        "rename in textwrap.dedent",
        RENAME.format(
            old="the variable `margin`",
            new="`common_prefix`",
            src=inspect.getsource(textwrap.dedent),
        ),
    ),
    ("code", "Fibonacci", "Write a Python function that returns the nth Fibonacci number."),
    (
        "code",
        "CSV line",
        "Write a Python function that splits one CSV line into fields, handling quoted fields.",
    ),
    (
        "chat",
        "KV cache",
        "Explain in a short paragraph what a KV cache is and why it speeds up text generation.",
    ),
    ("chat", "readable Python", "Give three tips for writing readable Python code."),
]
# (drafter, draft length) of the timed runs
TIMED = [("draft-0.5B", 4), ("prompt-lookup", 4), ("prompt-lookup", 8)]


def timed_tokens(engine, ids, max_new_tokens, **settings):
    """The new tokens, the seconds to the first one (prefill) and the decode tok/s after it."""
    started = time.perf_counter()
    tokens, times = [], []
    for token in engine(ids, max_new_tokens, **settings):
        tokens.append(int(token.reshape(-1)[0]))
        times.append(time.perf_counter())
    decode = (len(tokens) - 1) / (times[-1] - times[0])
    return tokens, times[0] - started, decode


def median_seconds(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def costs(target, draft, ids, repeat: int) -> dict:
    """Seconds for one target pass over n = 1..9 tokens and one draft step, after the prompt."""
    prompt = ids[0].tolist()
    verifier, drafter = CachedModel(target), CachedModel(draft)
    verifier.extend(prompt, last_only=True)
    drafter.extend(prompt, last_only=True)

    def verify(n):
        verifier.extend(prompt[:n])
        verifier.rollback(len(prompt))

    def draft_step():
        drafter.extend(prompt[:1])
        drafter.rollback(len(prompt))

    return {
        "verify_s": {n: median_seconds(functools.partial(verify, n), repeat) for n in range(1, 10)},
        "draft_step_s": median_seconds(draft_step, repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--prompts", nargs="+", help="only these prompt names (to rerun a disturbed one)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    target = minqwen.Qwen2.from_pretrained(minqwen.fetch("embedded-1.5b"))
    draft = minqwen.Qwen2.from_pretrained(minqwen.fetch("embedded"))
    tokenizer = minqwen.BPETokenizer.from_file(minqwen.fetch("embedded"))
    greedy = {"do_sample": False}
    sampling = SamplingConfig.resolve(target.config.sampling_defaults, **greedy)
    drafters = {"draft-0.5B": draft, "prompt-lookup": PromptLookup()}
    records = [
        {
            "record": "run",
            "date": datetime.date.today().isoformat(),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "dtype": "float32",
            "target": "Qwen2.5-Coder-1.5B-Instruct (embedded-1.5b)",
            "draft": "Qwen2.5-Coder-0.5B-Instruct (embedded)",
            "max_new_tokens": args.max_new_tokens,
            "sampling": "greedy, the checkpoint's repetition_penalty (1.05)",
        }
    ]
    for category, name, text in PROMPTS:
        if args.prompts and name not in args.prompts:
            continue
        chat = minqwen.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(chat)])
        prompt = ids.shape[1]
        reference, prefill_s, alone = timed_tokens(
            lambda *a, **kw: minqwen.generate_tokens(target, *a, **kw),
            ids,
            args.max_new_tokens,
            **greedy,
        )
        tokens = ids[0].tolist() + reference
        runs = [{"drafter": "none", "k": 0, "decode_tok_s": alone, "prefill_s": prefill_s}]
        for drafter, k in TIMED:
            decoder = SpeculativeDecoder(target, drafters[drafter], num_draft_tokens=k)
            new, prefill_s, decode = timed_tokens(
                decoder.generate_tokens, ids, args.max_new_tokens, **greedy
            )
            if new != reference:
                raise SystemExit(f"{name}: {drafter} k={k} parted from the target's greedy tokens")
            replayed = replay_rounds(
                tokens,
                prompt,
                args.max_new_tokens,
                k,
                hits=draft_hits(draft, tokens, prompt, sampling)
                if drafter == "draft-0.5B"
                else None,
                lookup=drafters[drafter] if drafter == "prompt-lookup" else None,
                eos_ids=target.config.eos_token_ids,
            )
            stats = decoder.stats
            runs.append(
                {
                    "drafter": drafter,
                    "k": k,
                    "decode_tok_s": decode,
                    "prefill_s": prefill_s,
                    "rounds": stats.rounds,
                    "drafted": stats.drafted,
                    "accepted": stats.accepted,
                    "replayed_rounds": replayed.rounds,
                    "replayed_accepted": replayed.accepted,
                }
            )
            print(
                f"{name}: {drafter} k={k} {decode:.2f} tok/s against {alone:.2f}; {stats}",
                flush=True,
            )
        hits = draft_hits(draft, tokens, prompt, sampling)
        acceptance = {
            drafter: [
                vars(
                    replay_rounds(
                        tokens,
                        prompt,
                        args.max_new_tokens,
                        k,
                        hits=hits if drafter == "draft-0.5B" else None,
                        lookup=drafters[drafter] if drafter == "prompt-lookup" else None,
                        eos_ids=target.config.eos_token_ids,
                    )
                )
                for k in DRAFT_LENGTHS
            ]
            for drafter in drafters
        }
        records.append(
            {
                "record": "prompt",
                "category": category,
                "name": name,
                "prompt_tokens": prompt,
                "new_tokens": len(reference),
                "text": tokenizer.decode(reference),
                "runs": runs,
                "acceptance": acceptance,
            }
        )
        if category == "edit" and "costs" not in {r["record"] for r in records}:
            records.append(
                {"record": "costs", "context": prompt, **costs(target, draft, ids, args.repeat)}
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
