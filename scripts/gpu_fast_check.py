"""On a GPU: does minqwen-fast generate what minqwen-eager does, greedy and sampled, and at what speed?

Random weights with the real configs (the hub is out of reach from the GPU machine). Four checks, each writing
JSON lines to --out and printing one summary line:

- `agreement`: greedy tokens of the fast engine against the eager loop on the golden prompts, one left-padded
  batch; where they part, the gap between the two choices in the eager logits, in rounding steps.
- `seed`: a sampled run repeated with the same seed gives the same tokens (CUDA graphs replay the RNG).
- `chi-square`: at a fixed prompt, 2,000 rows x 10 seeds = 20,000 draws of the first new token (made by the
  prefill) and of the second (made by a CUDA-graph replay), against the eager processors' exact distribution: the
  first token's, and for the second, given the first, one test per value of the first token with the statistics
  and degrees of freedom summed. A control with the temperature off by 1.5x must be rejected. Float32, with a random head HEAD_SCALE times larger than the model's, so that
  random weights give a distribution peaked enough for the test to tell from a wrong one.
- `speed`: decode tok/s of greedy and sampled (the Instruct settings) runs, batch 1, prompt 128, 128 new tokens,
  bf16, measured side by side with minqwen.tools.bench.measure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minqwen.engine.fast import FastQwen2, greedy_agreement
from minqwen.engine.sampling import SamplingConfig, process_logits
from minqwen.tools.bench import load_hf, measure, minqwen_from_hf
from minqwen.tools.stats import chi_square

ROOT = Path(__file__).resolve().parents[1]
INSTRUCT = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
HEAD_SCALE = 4.0
DEVICE = "cuda"  # --device cpu runs a small smoke test of the script itself


def golden_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [
        json.loads(p.read_text())["prompt_ids"]
        for p in sorted((ROOT / "book" / "data" / "golden").glob("*.json"))
    ]
    if not prompts:
        raise SystemExit("no golden prompts in book/data/golden")
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids.to(DEVICE), mask.to(DEVICE)


def load(size: str, dtype: torch.dtype):
    return minqwen_from_hf(load_hf(size, DEVICE, dtype))


def check_agreement(out, size: str, dtype: torch.dtype, new_tokens: int) -> None:
    model = load(size, dtype)
    ids, mask = golden_batch(model.config.pad_token_id or 0)
    rows = greedy_agreement(model, FastQwen2(model), ids, new_tokens, attention_mask=mask)
    for r in rows:
        write(out, check="agreement", size=size, dtype=str(dtype), **r)
    parts = [
        f"{r['same']}/{new_tokens}" + (f" (gap {r['gap_ulps']:.1f} ulps)" if "gap" in r else "")
        for r in rows
    ]
    print(f"agreement {size} {dtype}: " + ", ".join(parts), flush=True)


def check_seed(out, size: str) -> None:
    model = load(size, torch.bfloat16)
    fast = FastQwen2(model)
    ids = torch.randint(0, 150_000, (4, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    first = fast.generate(ids, 64, seed=7, eos_token_id=[], **INSTRUCT)
    again = fast.generate(ids, 64, seed=7, eos_token_id=[], **INSTRUCT)
    other = fast.generate(ids, 64, seed=8, eos_token_id=[], **INSTRUCT)
    same, differs = torch.equal(first, again), not torch.equal(first, other)
    write(out, check="seed", size=size, same_seed_equal=same, other_seed_differs=differs)
    print(f"seed {size}: same seed, same tokens: {same}; another seed differs: {differs}")


def exact_probs(model, context: list[int], sampling: SamplingConfig) -> torch.Tensor:
    ids = torch.tensor([context], device=DEVICE)
    with torch.inference_mode():
        logits = model(ids, logits_to_keep=1)[:, -1].float()
    return process_logits(logits, ids, sampling).softmax(dim=-1)[0].double().cpu()


def check_distribution(out, size: str, rows: int, seeds: range) -> None:
    model = load(size, torch.float32)
    # A head of its own, larger than the random one: a tied random head makes every token predict itself, and a
    # small one gives near-flat logits; neither lets the test tell a right distribution from a wrong one.
    generator = torch.Generator().manual_seed(3)
    head = torch.randn(model.lm_head.weight.shape, generator=generator) * 0.02 * HEAD_SCALE
    model.lm_head.weight = torch.nn.Parameter(head.to(DEVICE), requires_grad=False)
    fast = FastQwen2(model)
    prompt = torch.randint(0, 150_000, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    batch = torch.tensor([prompt] * rows, device=DEVICE)
    firsts, seconds = [], []
    for seed in seeds:
        new = fast.generate(batch, 2, seed=seed, eos_token_id=[], **INSTRUCT)[:, -2:].cpu()
        firsts.append(new[:, 0])
        seconds.append(new[:, 1])
    firsts, seconds = torch.cat(firsts), torch.cat(seconds)
    write(out, check="draws", size=size, firsts=firsts.tolist(), seconds=seconds.tolist())
    vocab = model.config.vocab_size
    for label, temperature in (("exact", 0.7), ("control: temperature 1.05", 1.05)):
        sampling = SamplingConfig(**{**INSTRUCT, "temperature": temperature})
        p_first = exact_probs(model, prompt, sampling)
        tests = {"prefill": chi_square(torch.bincount(firsts, minlength=vocab), p_first)}
        # The second token, given the first: one test per value of the first token, summed.
        statistic, dof = 0.0, 0
        for token in firsts.unique().tolist():
            given = seconds[firsts == token]
            probs = exact_probs(model, prompt + [token], sampling)
            s, d, _ = chi_square(torch.bincount(given, minlength=vocab), probs)
            statistic, dof = statistic + s, dof + d
        tests["graph step"] = (statistic, dof, upper_tail(statistic, dof))
        for step, (statistic, dof, p_value) in tests.items():
            write(
                out,
                check="chi-square",
                size=size,
                against=label,
                step=step,
                draws=len(firsts),
                statistic=statistic,
                dof=dof,
                p_value=p_value,
            )
            print(
                f"chi-square {size} {step} vs {label}: p = {p_value:.3g} ({len(firsts)} draws, dof {dof})"
            )


def upper_tail(statistic: float, dof: int) -> float:
    """P(chi-square with `dof` degrees of freedom > statistic)."""
    if dof == 0:
        return 1.0
    a = torch.tensor(dof / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(statistic / 2, dtype=torch.float64)))


def check_speed(out, sizes: list[str], new_tokens: int) -> None:
    for size in sizes:
        fast = FastQwen2(load(size, torch.bfloat16))
        ids = torch.randint(0, 150_000, (1, 128), generator=torch.Generator().manual_seed(2)).to(
            DEVICE
        )
        speeds = {}
        for name, settings in (("greedy", dict(do_sample=False)), ("sampled", INSTRUCT)):

            def run(i, n, settings=settings, fast=fast):
                return fast.generate(i, n, eos_token_id=[], seed=0, **settings)

            speeds[name] = measure(run, ids, new_tokens, repeats=5, warmup=2)
            write(out, check="speed", size=size, mode=name, new_tokens=new_tokens, **speeds[name])
        ratio = speeds["sampled"]["decode_tok_s"] / speeds["greedy"]["decode_tok_s"]
        print(
            f"speed {size}: greedy {speeds['greedy']['decode_tok_s']:,.0f} tok/s, sampled "
            f"{speeds['sampled']['decode_tok_s']:,.0f} tok/s ({ratio:.1%} of greedy)",
            flush=True,
        )
        del fast
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def write(out, **record) -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    record.update(device=name, torch=torch.__version__)
    out.write(json.dumps(record) + "\n")
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default="agreement,seed,chi-square,speed")
    parser.add_argument("--speed-sizes", default="0.5B,7B")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    checks = args.checks.split(",")
    start = time.perf_counter()
    with open(args.out, "a") as out:
        if "agreement" in checks:
            check_agreement(out, "0.5B", torch.float32, 32)
            check_agreement(out, "0.5B", torch.bfloat16, 32)
        if "seed" in checks:
            check_seed(out, "0.5B")
        if "chi-square" in checks:
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            check_distribution(out, "0.5B", args.rows, seeds)
        if "speed" in checks:
            check_speed(out, args.speed_sizes.split(","), 128)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
