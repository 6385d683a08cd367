# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sampling, exactly as transformers does it
#
# Greedy decoding always picks the most likely token. Sampling draws the next token at random from the model's
# distribution, reshaped first by a chain of filters. The Instruct model's defaults use four of them: a
# repetition penalty of 1.05, temperature 0.7, top-k 20 and top-p 0.8. `minqwen.engine.sampling` implements each filter,
# and `minqwen.generate` puts them in a loop. The goal of this chapter is not "similar" output but **the same
# tokens** as `torch.manual_seed(seed); model.generate(...)`, and an explanation of why that is possible at all.

# %%
# NBVAL_IGNORE_OUTPUT
# %matplotlib inline
from helpers import (
    DEVICE,
    golden_applies,
    hf_model,
    load_golden,
    show_source,
    stamp,
    tokenizer,
)

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import minqwen
from minqwen.engine.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    select_next_token,
    top_k_filter,
    top_p_filter,
)

# generate() warns when it is handed sampling settings with do_sample=False. The comparisons below pass every
# setting on purpose, to keep the model's own defaults out, so that warning is expected noise here.
transformers.logging.set_verbosity_error()
model, tok = hf_model(), tokenizer()
print(stamp())

# %% [markdown]
# ## Real logits to work on
#
# A filter only has work to do where the model hesitates. After most prefixes one token takes nearly all the
# probability; so we take the golden English answer, compute the next-token distribution at every step in one
# forward pass, and keep the step where the model was least sure (highest entropy). Its logits, computed again on
# that prefix exactly as `generate()` would (float32, last position only), are the real logits of this chapter.

# %%
english = {r["name"]: r for r in load_golden()}["english"]
answer = torch.tensor([english["output_ids"]], device=DEVICE)
start = len(english["prompt_ids"])
with torch.inference_mode():
    every_step = model(answer).logits[0, start - 1 : -1].float()
entropy = -(every_step.softmax(-1) * every_step.log_softmax(-1)).sum(-1)
step = int(entropy.argmax())
context = answer[:, : start + step]
with torch.inference_mode():
    real_logits = (
        model(context, logits_to_keep=1).logits[:, -1].float().cpu()
    )  # [1, vocab]
real_seen = context.cpu()
print(
    f"step {step} of {len(entropy)}, entropy {entropy[step]:.2f} nats, after: ...{tok.decode(context[0, -12:])!r}"
)


def label(token_id: int) -> str:
    """A token as plot-friendly text: non-ASCII tokens show as their id (the plot font lacks CJK glyphs)."""
    text = tok.decode(int(token_id))
    return repr(text)[1:-1][:8] if text.isascii() else f"#{int(token_id)}"


top = real_logits[0].softmax(-1).topk(5)
print(
    [
        (tok.decode(int(i)), round(p, 3))
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
)

# %% [markdown]
# ## The filters, one by one
#
# Each filter takes logits [batch, vocab] and returns new ones, with the tokens it removes set to −∞ (probability
# zero after the softmax).
#
# **Repetition penalty** makes tokens already in the sequence less likely: a positive logit is divided by the
# penalty, a negative one multiplied, each token once however often it occurred. With left padding, the padded
# positions are skipped.

# %%
show_source(apply_repetition_penalty)

# %% [markdown]
# **Temperature** divides the logits: below 1 the distribution sharpens, above 1 it flattens. Temperature 0 would
# divide by zero; in `minqwen.generate` it means greedy.

# %%
show_source(apply_temperature)

# %% [markdown]
# **Top-k** keeps the k highest logits. A token that ties with the k-th is kept too, so more than k can survive.

# %%
show_source(top_k_filter)

# %% [markdown]
# **Top-p** (nucleus) keeps the most likely tokens until their probabilities add up to at least p. The
# implementation works from the *unlikely* end: sort ascending, accumulate, and drop every token whose running
# total is still within the 1 − p tail. Accumulating from the likely end is mathematically the same set, but
# float32 sums in a different order round differently, and at the boundary that can keep one token more or less.

# %%
show_source(top_p_filter)

# %% [markdown]
# **Min-p** keeps the tokens at least `min_p` times as likely as the most likely one, a cut that tightens when the
# model is confident and loosens when it is not.

# %%
show_source(min_p_filter)

# %% [markdown]
# Every filter has a `min_tokens_to_keep` floor (1 unless asked), so no filter can remove everything.
#
# ## Against transformers' own processors
#
# The reference is transformers' `LogitsProcessor` classes, the very objects `generate()` builds. We compare on
# random logits (normal, and drawn from seven values so that ties are everywhere), for several settings and
# `min_tokens_to_keep` 1 and 5, and on the real logits above. "Identical" means `torch.equal`: same −∞ entries and
# same values, bit for bit.


# %%
def random_logits(seed: int, ties: bool, shape=(4, 1000)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-3, 4, shape, generator=generator).float() * 0.5
    return torch.randn(shape, generator=generator) * 3


seen_ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(99))

FILTERS = {
    "repetition penalty 1.05": (
        lambda x, ids, keep: apply_repetition_penalty(x, ids, 1.05),
        lambda keep: RepetitionPenaltyLogitsProcessor(1.05),
    ),
    "repetition penalty 0.8": (
        lambda x, ids, keep: apply_repetition_penalty(x, ids, 0.8),
        lambda keep: RepetitionPenaltyLogitsProcessor(0.8),
    ),
    "temperature 0.7": (
        lambda x, ids, keep: apply_temperature(x, 0.7),
        lambda keep: TemperatureLogitsWarper(0.7),
    ),
    "top-k 1": (
        lambda x, ids, keep: top_k_filter(x, 1, keep),
        lambda keep: TopKLogitsWarper(1, min_tokens_to_keep=keep),
    ),
    "top-k 20": (
        lambda x, ids, keep: top_k_filter(x, 20, keep),
        lambda keep: TopKLogitsWarper(20, min_tokens_to_keep=keep),
    ),
    "top-p 0.8": (
        lambda x, ids, keep: top_p_filter(x, 0.8, keep),
        lambda keep: TopPLogitsWarper(0.8, min_tokens_to_keep=keep),
    ),
    "top-p 0.3": (
        lambda x, ids, keep: top_p_filter(x, 0.3, keep),
        lambda keep: TopPLogitsWarper(0.3, min_tokens_to_keep=keep),
    ),
    "min-p 0.1": (
        lambda x, ids, keep: min_p_filter(x, 0.1, keep),
        lambda keep: MinPLogitsWarper(0.1, min_tokens_to_keep=keep),
    ),
    "min-p 0.5": (
        lambda x, ids, keep: min_p_filter(x, 0.5, keep),
        lambda keep: MinPLogitsWarper(0.5, min_tokens_to_keep=keep),
    ),
}

rows = []
for name, (ours, theirs) in FILTERS.items():
    identical = {"random": 0, "random, ties": 0, "real": 0}
    for keep in (1, 5):
        for seed in range(10):
            for ties in (False, True):
                x = random_logits(seed, ties)
                identical["random, ties" if ties else "random"] += torch.equal(
                    ours(x, seen_ids, keep), theirs(keep)(seen_ids, x.clone())
                )
        identical["real"] += torch.equal(
            ours(real_logits, real_seen, keep),
            theirs(keep)(real_seen, real_logits.clone()),
        )
    kept = int(torch.isfinite(ours(real_logits, real_seen, 1)).sum())
    rows.append(
        {
            "filter": name,
            **{
                f"identical, {k}": f"{v}/{20 if k != 'real' else 2}"
                for k, v in identical.items()
            },
            "tokens kept (real)": kept,
        }
    )
comparison = pd.DataFrame(rows).set_index("filter")
comparison

# %%
assert (
    (
        comparison.filter(like="identical").map(
            lambda s: s.split("/")[0] == s.split("/")[1]
        )
    )
    .all()
    .all()
)

# %% [markdown]
# ## The chain, and what each filter does to a real distribution
#
# `generate()` applies the filters in a fixed order: repetition penalty, temperature, top-k, top-p, min-p. Each
# one is skipped when its setting is neutral (penalty 1, temperature 1, top-k 0, top-p 1, min-p 0), and in greedy
# mode only the repetition penalty applies. `process_logits` is that chain:

# %%
show_source(process_logits)

# %% [markdown]
# Below, the real distribution through the Instruct defaults, one filter at a time, then a min-p
# of 0.3 on top. Bars are the 24 most likely tokens; grey bars have been filtered out.

# %%
stages = {"model (T=1)": real_logits}
stages["penalty 1.05"] = apply_repetition_penalty(
    stages["model (T=1)"], real_seen, 1.05
)
stages["temperature 0.7"] = apply_temperature(stages["penalty 1.05"], 0.7)
stages["top-k 20"] = top_k_filter(stages["temperature 0.7"], 20)
stages["top-p 0.8"] = top_p_filter(stages["top-k 20"], 0.8)
stages["min-p 0.3"] = min_p_filter(stages["top-p 0.8"], 0.3)

order = real_logits[0].argsort(descending=True)[:24]
labels = [label(i) for i in order]
fig, axes = plt.subplots(1, len(stages), figsize=(14, 3), sharey=True)
for ax, (name, logits) in zip(axes, stages.items()):
    probs = logits[0].softmax(-1)[order].numpy()
    kept = torch.isfinite(logits[0][order]).numpy()
    ax.bar(range(len(order)), np.where(kept, probs, 0), color="tab:blue")
    ax.bar(
        range(len(order)),
        np.where(kept, 0, real_logits[0].softmax(-1)[order].numpy()),
        color="lightgrey",
    )
    ax.set_title(f"{name}\n{int(torch.isfinite(logits).sum())} tokens left", fontsize=9)
    ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=6)
axes[0].set_ylabel("probability")
fig.tight_layout()
plt.show()

# %%
pd.DataFrame(
    {
        "tokens left": [int(torch.isfinite(s).sum()) for s in stages.values()],
        "top probability": [
            round(float(s[0].softmax(-1).max()), 3) for s in stages.values()
        ],
    },
    index=list(stages),
)

# %% [markdown]
# The chain equals transformers' chain bit for bit, here for the Instruct defaults and for random settings:


# %%
def hf_chain(config: SamplingConfig, ids, logits):
    out = RepetitionPenaltyLogitsProcessor(config.repetition_penalty)(
        ids, logits.clone()
    )
    for processor in (
        TemperatureLogitsWarper(float(config.temperature)),
        TopKLogitsWarper(config.top_k) if config.top_k else None,
        TopPLogitsWarper(config.top_p) if config.top_p < 1 else None,
        MinPLogitsWarper(config.min_p),
    ):
        out = processor(ids, out) if processor is not None else out
    return out


settings_rng = np.random.default_rng(0)
configs = [
    SamplingConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
    )
]
configs += [
    SamplingConfig(
        do_sample=True,
        temperature=float(settings_rng.uniform(0.2, 2)),
        top_k=int(settings_rng.integers(0, 60)),
        top_p=float(settings_rng.uniform(0.05, 1)),
        min_p=float(settings_rng.uniform(0, 0.5)),
        repetition_penalty=float(settings_rng.uniform(0.5, 2)),
    )
    for _ in range(20)
]
chain_equal = [
    torch.equal(process_logits(x, ids, c), hf_chain(c, ids, x))
    for c in configs
    for x, ids in [(real_logits, real_seen), (random_logits(7, True), seen_ids)]
]
print(f"chains identical: {sum(chain_equal)}/{len(chain_equal)}")
assert all(chain_equal)

# %% [markdown]
# ## Do the draws follow the filtered distribution?
#
# Equal filters are half the story; the draw is the other. `select_next_token` draws with `torch.multinomial`
# from the softmax of the filtered scores. A chi-square goodness-of-fit test compares how often each token came
# up in 20,000 seeded draws with how often it should have. The filtered-out tokens have probability zero, so we
# draw over the surviving ones only (the softmax of the kept scores is the same distribution), which keeps the
# batch small. As a control, the same counts are tested against the *unfiltered* distribution, which they must
# fail: a test that cannot fail proves nothing.


# %%
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's statistic, degrees of freedom and p-value (upper regularized gamma: no scipy needed)."""
    expected = probs.double() * counts.sum()
    statistic = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    p_value = float(
        torch.special.gammaincc(
            torch.tensor(dof / 2, dtype=torch.float64),
            torch.tensor(statistic / 2, dtype=torch.float64),
        )
    )
    return statistic, dof, p_value


instruct = configs[0]
filtered = process_logits(real_logits, real_seen, instruct)[0]
kept = torch.isfinite(filtered).nonzero().squeeze(1)
assert len(kept) >= 3, (
    "too few tokens survive the filters for a goodness-of-fit test to mean anything"
)
draws = 20_000
torch.manual_seed(0)
samples = select_next_token(filtered[kept].expand(draws, -1), instruct)
counts = torch.bincount(samples, minlength=len(kept))

target = filtered[kept].softmax(-1)
unfiltered = real_logits[0, kept].softmax(-1)
tests = pd.DataFrame(
    [
        dict(
            zip(["chi2", "dof", "p-value"], chi_square(counts, target)),
            against="filtered distribution",
        ),
        dict(
            zip(["chi2", "dof", "p-value"], chi_square(counts, unfiltered)),
            against="model (T=1, same tokens)",
        ),
    ]
).set_index("against")
tests.round({"chi2": 1, "p-value": 4})

# %%
assert tests.loc["filtered distribution", "p-value"] > 0.01
# the control must fail when the two distributions differ enough for this many draws to tell them apart; near-flat
# logits (random weights) can leave them too close, and then the control proves nothing either way
power = draws * float(
    ((target - unfiltered) ** 2 / unfiltered).sum()
)  # the chi-square's noncentrality
print(f"noncentrality of the control: {power:,.0f}")
if power > 100:
    assert tests.loc["model (T=1, same tokens)", "p-value"] < 1e-6
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(
    np.arange(len(kept)) - 0.2,
    (counts / draws).numpy(),
    width=0.4,
    label="sampled frequency",
)
ax.bar(
    np.arange(len(kept)) + 0.2, target.numpy(), width=0.4, label="filtered probability"
)
ax.set_xticks(range(len(kept)), [label(i) for i in kept], rotation=90, fontsize=7)
ax.set(
    ylabel="probability",
    title=f"{draws:,} seeded draws from the Instruct-default distribution",
)
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The whole loop: `minqwen.generate` against `model.generate`
#
# `minqwen.generate` takes any HF causal LM (and, from chapter 3 on, the from-scratch model). Its loop mirrors
# `generate()`'s: prefill the prompt, then one token per step through the cache, float32 logits of the last
# position, the chain above, one draw. `generate_tokens` yields each step's tokens; `generate` collects them.

# %%
show_source(minqwen.generate_tokens)

# %% [markdown]
# One trap on the HF side: `model.generate` fills every setting you leave out from the model's
# `generation_config`, so a comparison must pass every setting explicitly. Passing `top_k=0` is enough to turn
# top-k off (transformers skips top-k when it is 0), but leaving it out brings back the Instruct default of 20.
# One step with `output_scores=True`, on the prefix above, shows what each call actually filtered:


# %%
def hf_scores(**settings) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(
            context,
            attention_mask=torch.ones_like(context),
            max_new_tokens=1,
            return_dict_in_generate=True,
            output_scores=True,
            **settings,
        )
    return out.scores[0]


left_out = hf_scores(do_sample=True)
explicit = hf_scores(
    do_sample=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
)
print(
    "settings left out:     ",
    int(torch.isfinite(left_out).sum()),
    "tokens can be drawn",
)
print(
    "every setting explicit:",
    int(torch.isfinite(explicit).sum()),
    "tokens can be drawn",
)
assert int(torch.isfinite(left_out).sum()) <= 20 and torch.equal(
    explicit.cpu(), real_logits
)

# %% [markdown]
# Now the comparison, on a prompt from the golden set, greedy and sampled with seeds. `hf_generate` is the
# reference call with every setting spelled out.

# %%
NEUTRAL = dict(
    do_sample=False,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
)
RUNS = {
    "greedy": (dict(do_sample=False), None),
    "greedy, penalty 1.05": (dict(do_sample=False, repetition_penalty=1.05), None),
    "Instruct defaults, seed 0": (
        dict(
            do_sample=True,
            temperature=0.7,
            top_k=20,
            top_p=0.8,
            repetition_penalty=1.05,
        ),
        0,
    ),
    "hot, min-p 0.05, seed 1": (
        dict(do_sample=True, temperature=1.3, top_p=0.95, min_p=0.05),
        1,
    ),
}
NEW_TOKENS = 12


def hf_generate(ids, seed, settings):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            pad_token_id=model.generation_config.pad_token_id,
            **{**NEUTRAL, **settings},
        )


english_prompt = torch.tensor([english["prompt_ids"]], device=DEVICE)
rows, outputs = [], {}
for name, (settings, seed) in RUNS.items():
    outputs[name] = minqwen.generate(
        model, english_prompt, NEW_TOKENS, seed=seed, **settings
    )
    theirs = hf_generate(english_prompt, seed, settings)
    new = outputs[name][0, english_prompt.shape[1] :]
    rows.append(
        {
            "run": name,
            "identical": torch.equal(outputs[name], theirs),
            "text": tok.decode(new, skip_special_tokens=True),
        }
    )
runs = pd.DataFrame(rows).set_index("run")
runs

# %%
assert runs["identical"].all()
if golden_applies():
    assert (
        outputs["greedy"][0].tolist()
        == english["output_ids"][: english_prompt.shape[1] + NEW_TOKENS]
    )

# %% [markdown]
# ## Why the tokens are identical, not just similar
#
# Random sampling can still be reproduced exactly, because "random" here means a deterministic generator from a
# seed. The two loops agree at every step because every input to every decision agrees:
#
# 1. **The same logits.** Both run the same model on the same inputs, in the same way: the whole prompt once, then
#    one token per step with its cache; the float32 logits of the last position only (transformers passes
#    `logits_to_keep=1`, so do we); no attention mask when nothing is padded, which keeps attention on the
#    same kernel.
# 2. **The same processing.** The same filters, in the same order, with the same floating-point operations
#    (which is why top-p accumulates from the unlikely end), applied only where transformers applies them.
# 3. **The same draw.** Exactly one `torch.multinomial(softmax(scores), 1)` per step, on the global RNG that
#    `torch.manual_seed(seed)` set, and nothing else touching that RNG in between. One extra random call anywhere,
#    even one whose result is thrown away, would shift every later draw.
#
# Break any one of these and the outputs part ways at some step, after which they have nothing in common. The
# tests in `tests/test_ch1_generate.py` hold `minqwen.generate` to this on prompts and settings this chapter does
# not use, with and without the cache, and for left-padded batches.
