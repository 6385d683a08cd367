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
# distribution, reshaped first by a chain of filters; the Instruct model's defaults use four of them. What does
# each filter compute, and can a loop written from scratch give not "similar" output but **the same tokens** as
# `torch.manual_seed(seed); model.generate(...)`?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the filters of the sampling chain, each as a formula beside its code: the {term}`repetition penalty`,
#   {term}`temperature`, {term}`top-k`, {term}`top-p` and {term}`min-p`;
# - how to check a filter bit for bit against transformers' own processors, and a sampler in distribution
#   with a chi-square test;
# - why `minqwen.generate` and `model.generate` give identical tokens for the same seed, with no settings or
#   with any.
#
# **You need** the greedy loop of {doc}`02_explicit_loop` and the settings rule of {doc}`01_pipeline`
# (what you pass, else `generation_config.json`, else transformers' defaults). Running it takes the embedded
# model, about a minute on a laptop CPU.
# ```

# %% tags=["hide-input", "nbval-ignore-output"]
# %matplotlib inline
from figures import sampling as figures
from helpers import (
    DEVICE,
    golden_applies,
    hf_model,
    load_golden,
    show_source,
    stamp,
    tokenizer,
)

import dataclasses

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
from minqwen.engine.generate import decode
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
from minqwen.tools.hf_adapter import HFAdapter
from minqwen.tools.stats import chi_square

# generate() warns when it is handed sampling settings with do_sample=False; the comparisons below pass every
# setting on purpose, so that warning is expected here.
transformers.logging.set_verbosity_error()
model, tok = hf_model(), tokenizer()
print(stamp())

# %% [markdown]
# ## Real logits to work on
#
# A filter only has work to do where the model hesitates; after most prefixes one token takes nearly all the
# probability. So we take the golden English answer, compute the next-token distribution at every step in one
# forward pass, and keep the step where the model was least sure (highest entropy). Its {term}`logits`, computed
# again on that prefix exactly as `generate()` would (float32, last position only), are the real logits of this
# page. The five most likely next tokens:

# %% tags=["hide-input"]
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


def label(token_id: int) -> str:
    """A token as plot-friendly text: non-ASCII tokens show as their id (the plot font lacks CJK glyphs)."""
    text = tok.decode(int(token_id)).strip() or repr(tok.decode(int(token_id)))
    return text[:20] if text.isascii() else f"#{int(token_id)}"


print(
    f"step {step} of {len(entropy)}, entropy {entropy[step]:.2f} nats, "
    f"after {tok.decode(context[0, -12:])!r}"
)
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
# Each filter takes logits $z \in \mathbb{R}^{V}$ per row ([batch, vocab]) and returns new ones, with the tokens
# it removes set to $-\infty$: probability zero after the softmax.
#
# ### Repetition penalty
#
# Tokens already in the sequence become less likely. With penalty $\theta$ and $S$ the set of tokens seen so far
# (prompt included, each token once however often it occurred):
#
# $$
# z_i \leftarrow \begin{cases} z_i / \theta & \text{if } z_i > 0 \\ z_i \, \theta & \text{if } z_i \le 0
# \end{cases} \qquad i \in S.
# $$
#
# Dividing a positive logit and multiplying a negative one both lower it when $\theta > 1$. With left padding,
# the padded positions are skipped (`ignore_before`).

# %%
show_source(apply_repetition_penalty)

# %% [markdown]
# ### Temperature
#
# The probabilities are the softmax of the logits divided by the temperature $T$:
#
# $$
# p_i = \frac{\exp(z_i / T)}{\sum_j \exp(z_j / T)}.
# $$
#
# Below 1 the distribution sharpens, above 1 it flattens. $T = 0$ would divide by zero; in `minqwen.generate` it
# means greedy.

# %%
show_source(apply_temperature)

# %% [markdown]
# ### Top-k
#
# Keep the $k$ highest logits. With $z_{(k)}$ the $k$-th largest value, token $i$ survives when
# $z_i \ge z_{(k)}$, so a token that ties with the $k$-th is kept too and more than $k$ can survive.

# %%
show_source(top_k_filter)

# %% [markdown]
# ### Top-p (the nucleus)
#
# Keep the smallest set of most likely tokens whose probability mass reaches $p$. Sorting the probabilities in
# ascending order, $p_{(1)} \le p_{(2)} \le \dots \le p_{(V)}$, transformers computes it from the *least* likely
# end: token $(j)$ is dropped when the mass up to and including it stays within the tail $1 - p$,
#
# $$
# \text{drop } (j) \iff \sum_{m=1}^{j} p_{(m)} \le 1 - p.
# $$
#
# What survives is the nucleus. Accumulating from the likely end is mathematically the same set, but float32
# sums in a different order round differently, and at the boundary that can keep one token more or less.

# %%
show_source(top_p_filter)

# %% [markdown]
# ### Min-p
#
# Keep the tokens at least `min_p` times as likely as the most likely one:
#
# $$
# \text{keep } i \iff p_i \ge p_{\min} \cdot \max_j p_j,
# $$
#
# a cut that tightens when the model is confident and loosens when it is not.

# %%
show_source(min_p_filter)

# %% [markdown]
# Every filter has a `min_tokens_to_keep` floor (1 unless asked), so no filter can remove everything.
#
# ## Against transformers' own processors
#
# The reference is transformers' `LogitsProcessor` classes, the very objects `generate()` builds. Each filter is
# compared, at two settings and with `min_tokens_to_keep` 1 and 5, on random logits (normal, and drawn from
# seven values so that ties are everywhere) and on the real logits above. "Identical" means `torch.equal`: same
# $-\infty$ entries and same values, bit for bit. The comparison code and the full table are folded.


# %% tags=["hide-input"]
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
all_equal = (
    comparison.filter(like="identical")
    .map(lambda s: s.split("/")[0] == s.split("/")[1])
    .all()
    .all()
)
cases = len(FILTERS) * (2 * 10 * 2 + 2)
print(
    f"{len(FILTERS)} filter settings, {cases} cases: all identical to transformers' ({all_equal})"
)

# %%
assert all_equal

# %% tags=["remove-input", "hide-output"]
comparison

# %% [markdown]
# ## The chain, and what each filter does to a real distribution
#
# `generate()` applies the filters in a fixed order: repetition penalty, temperature, top-k, top-p, min-p. Each
# is skipped when its setting is neutral (penalty 1, temperature 1, top-k 0, top-p 1, min-p 0), and in greedy
# mode only the repetition penalty applies. `process_logits` is that chain:

# %%
show_source(process_logits)

# %% [markdown]
# Below, the real distribution through the Instruct defaults one filter at a time, then a min-p of 0.3 on top.
# Bars are the 16 most likely tokens; a grey bar is a token the stage has filtered out, drawn at the model's
# probability.

# %% tags=["hide-input"]
stages = {"model (T=1)": real_logits}
stages["penalty 1.05"] = apply_repetition_penalty(
    stages["model (T=1)"], real_seen, 1.05
)
stages["temperature 0.7"] = apply_temperature(stages["penalty 1.05"], 0.7)
stages["top-k 20"] = top_k_filter(stages["temperature 0.7"], 20)
stages["top-p 0.8"] = top_p_filter(stages["top-k 20"], 0.8)
stages["min-p 0.3"] = min_p_filter(stages["top-p 0.8"], 0.3)
order = real_logits[0].argsort(descending=True)[:16]
figures.filter_chain(stages, [label(i) for i in order], order)

# %% tags=["hide-input"]
pd.DataFrame(
    {
        "tokens left": [int(torch.isfinite(s).sum()) for s in stages.values()],
        "top probability": [
            round(float(s[0].softmax(-1).max()), 3) for s in stages.values()
        ],
    },
    index=pd.Index(list(stages), name="after"),
)

# %% [markdown]
# The penalty lowers the tokens already in the answer; temperature 0.7 sharpens everything; top-k and top-p cut
# the tail, and each cut raises the survivors' probabilities, since they are renormalised.
#
# The chain equals transformers' chain bit for bit, for the Instruct defaults and for twenty random settings,
# on the real logits and on tied random ones (`hf_chain`, folded, builds transformers' processors in the same
# order):


# %% tags=["hide-input"]
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
instruct = SamplingConfig(
    do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
)
configs = [instruct] + [
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

# %%
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
# from the softmax of the filtered scores. Pearson's chi-square test compares how often each token came up in
# 20,000 seeded draws with how often it should have: with $n$ draws, $O_i$ observed and $E_i = n p_i$ expected
# counts,
#
# $$
# \chi^2 = \sum_i \frac{(O_i - E_i)^2}{E_i},
# $$
#
# and a small p-value says the draws did not come from $p$. `minqwen.tools.stats.chi_square` is the book's one
# implementation (it pools categories expected fewer than 5 times, where the test's approximation fails):

# %%
show_source(chi_square)

# %% [markdown]
# The filtered-out tokens have probability zero, so we draw over the surviving ones only (the softmax of the
# kept scores is the same distribution), which keeps the batch small. As a control, the same counts are tested
# against the *unfiltered* distribution, which they must fail: a test that cannot fail proves nothing.

# %%
filtered = process_logits(real_logits, real_seen, instruct)[0]
kept = torch.isfinite(filtered).nonzero().squeeze(1)
assert len(kept) >= 3, (
    "too few tokens survive the filters for the test to mean anything"
)
draws = 20_000
torch.manual_seed(0)
samples = select_next_token(filtered[kept].expand(draws, -1), instruct)
counts = torch.bincount(samples, minlength=len(kept))

target = filtered[kept].softmax(-1)
unfiltered = real_logits[0, kept].softmax(-1)
against = {"filtered": target, "model (T=1, same tokens)": unfiltered}
tests = pd.DataFrame(
    [chi_square(counts, probs) for probs in against.values()],
    index=pd.Index(list(against), name="against"),
    columns=["chi2", "dof", "p-value"],
)
tests.round({"chi2": 1, "p-value": 4})

# %% tags=["hide-input"]
figures.draws(counts, target, [label(i) for i in kept], draws)

# %% [markdown]
# The draws fit the filtered distribution (a p-value above the 0.01 the check requires) and fail the unfiltered
# one. The control can
# only fail where the two distributions differ enough for this many draws to tell them apart; near-flat logits
# (random weights) can leave them too close, which the noncentrality of the test measures (how far apart the two
# distributions are, scaled by the number of draws), and then the control
# proves nothing either way.

# %%
assert tests.loc["filtered", "p-value"] > 0.01
power = draws * float(((target - unfiltered) ** 2 / unfiltered).sum())  # noncentrality
print(f"noncentrality of the control: {power:,.0f}")
if power > 100:
    assert tests.loc["model (T=1, same tokens)", "p-value"] < 1e-6

# %% [markdown]
# ## The whole loop: `minqwen.generate` against `model.generate`
#
# `minqwen.generate` drives minqwen's own model (chapter 3 builds it) and, through `HFAdapter`, a transformers
# model, here HF's, so that the loop is tested apart from the model. `generate_tokens` checks and resolves the
# request (`minqwen.engine.request.prepare`, with the settings rule of {doc}`01_pipeline`), then runs the loop below:
# prefill the prompt, then one token per step through the cache, float32 logits of the last position, the chain
# above, one draw.

# %%
show_source(decode)

# %% [markdown]
# Leaving a setting out is not the same as turning it off: `model.generate` fills every setting left out from
# the checkpoint's `generation_config.json`. One step with `output_scores=True`, on the prefix above, shows what
# each call actually filtered: with only `do_sample=True`, the Instruct defaults apply; with every setting
# spelled out as neutral, nothing is filtered and the scores are the raw logits.


# %% tags=["hide-input"]
def hf_scores(**settings) -> torch.Tensor:
    """The scores `model.generate` drew the first new token from, after the prefix above."""
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


# %%
NEUTRAL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
left_out = hf_scores(do_sample=True)
explicit = hf_scores(do_sample=True, **NEUTRAL)
print(
    f"settings left out:      {int(torch.isfinite(left_out).sum()):,} tokens can be drawn"
)
print(
    f"every setting explicit: {int(torch.isfinite(explicit).sum()):,} tokens can be drawn"
)
assert int(torch.isfinite(left_out).sum()) <= 20 and torch.equal(
    explicit.cpu(), real_logits
)

# %% [markdown]
# Now the comparison, on the English prompt: greedy with and without the penalty, sampled runs with seeds, and a
# call with **no settings at all** on both sides, which samples with the checkpoint's defaults. Each run passes
# exactly the same arguments to `minqwen.generate(HFAdapter(model), prompt, 12, seed=seed, **settings)` and to
# `torch.manual_seed(seed); model.generate(prompt, max_new_tokens=12, **settings)` (`hf_generate`, folded).

# %% tags=["hide-input"]
NEW_TOKENS = 12
adapter = HFAdapter(model)
prompt = torch.tensor([english["prompt_ids"]], device=DEVICE)


def hf_generate(settings, seed):
    """torch.manual_seed(seed); model.generate(...) with exactly `settings`."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            **settings,
        )


# %%
INSTRUCT = dataclasses.asdict(instruct)  # the checkpoint's defaults, spelled out
RUNS = {
    "no settings, seed 0": ({}, 0),
    "Instruct defaults spelled out, seed 0": (INSTRUCT, 0),
    "greedy (penalty 1.05 from the file)": (dict(do_sample=False), None),
    "greedy, penalty off": (dict(do_sample=False, repetition_penalty=1.0), None),
    "hot, min-p 0.05, seed 1": (
        dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.95, min_p=0.05),
        1,
    ),
}
outputs, identical = {}, {}
for name, (settings, seed) in RUNS.items():
    outputs[name] = minqwen.generate(adapter, prompt, NEW_TOKENS, seed=seed, **settings)
    identical[name] = torch.equal(outputs[name], hf_generate(settings, seed))
print(f"{sum(identical.values())}/{len(RUNS)} runs token-identical to model.generate")
assert all(identical.values())

# %% [markdown]
# Here is what each run wrote, in full:

# %% tags=["hide-input"]
for name, ids in outputs.items():
    print(
        f"{name:40s} {tok.decode(ids[0, prompt.shape[1] :], skip_special_tokens=True)!r}"
    )

# %% [markdown]
# The call with no settings and the one that spells out the Instruct defaults are the same request, so with the
# same seed they write the same text. The greedy run with the file's penalty is the golden reference's start;
# without the penalty it parts from it where {doc}`01_pipeline` found that the penalty flips a winner.

# %%
instruct_file = SamplingConfig.resolve(adapter.config.sampling_defaults) == instruct
if instruct_file:
    assert torch.equal(
        outputs["no settings, seed 0"], outputs["Instruct defaults spelled out, seed 0"]
    )
if golden_applies():
    golden_start = english["output_ids"][: prompt.shape[1] + NEW_TOKENS]
    assert outputs["greedy (penalty 1.05 from the file)"][0].tolist() == golden_start
    assert outputs["greedy, penalty off"][0].tolist() != golden_start

# %% [markdown]
# ## Why the tokens are identical, not just similar
#
# Random sampling can still be reproduced exactly, because "random" here means a deterministic generator from a
# seed. The two loops agree at every step because every input to every decision agrees:
#
# 1. **The same settings.** Each one left out is resolved the same way: the call, else `generation_config.json`,
#    else transformers' defaults.
# 2. **The same logits.** Both run the same model on the same inputs, in the same way: the whole prompt once,
#    then one token per step with its cache; the float32 logits of the last position only (transformers passes
#    `logits_to_keep=1`, so do we); no attention mask when nothing is padded, which keeps attention on the same
#    kernel.
# 3. **The same processing.** The same filters, in the same order, with the same floating-point operations
#    (which is why top-p accumulates from the unlikely end), applied only where transformers applies them.
# 4. **The same draw.** Exactly one `torch.multinomial(softmax(scores), 1)` per step, on the global generator
#    that `torch.manual_seed(seed)` set, and nothing else touching it in between. One extra random call anywhere,
#    even one whose result is thrown away, would shift every later draw.
#
# Break any one of these and the outputs part ways at some step, after which each goes its own way. The
# tests in `tests/test_ch1_generate.py` hold `minqwen.generate` to this on prompts and settings this page does
# not use, with and without the cache, and for left-padded batches.
#
# ## Summary
#
# - Sampling reshapes the logits with a fixed chain, repetition penalty, temperature, top-k, top-p, min-p, then
#   draws once from the softmax; greedy decoding keeps only the penalty and takes the argmax.
# - Each of minqwen's filters equals transformers' processor bit for bit, ties and `min_tokens_to_keep`
#   included; top-p must accumulate from the least likely end to round the same way.
# - A sampler is checked in distribution with a chi-square test, and the test is shown able to fail.
# - With the same settings and seed, `minqwen.generate` writes exactly the tokens of `model.generate`, including
#   a call with no settings, which samples with the checkpoint's defaults.
#
# ## Exercises
#
# ````{exercise}
# :label: sampling-topk-ties
# Write top-k from scratch with `torch.sort` (keep the first $k$ of the sorted order), and compare it with
# `top_k_filter` on the tied random logits. When do they differ, and which one matches transformers?
# ````
#
# ```{solution-start} sampling-topk-ties
# :class: dropdown
# ```


# %%
def top_k_by_sorting(logits, k):
    order = logits.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order[..., :k], True)
    return logits.masked_fill(~keep, float("-inf"))


x = random_logits(0, ties=True)
mine, package = top_k_by_sorting(x, 20), top_k_filter(x, 20)
print(
    f"kept per row: sorting {torch.isfinite(mine).sum(-1).tolist()}, "
    f"top_k_filter {torch.isfinite(package).sum(-1).tolist()}"
)
assert torch.equal(package, TopKLogitsWarper(20)(seen_ids, x.clone()))
assert not torch.equal(mine, package)

# %% [markdown]
# With seven distinct values, far more than 20 tokens tie with the 20th. Cutting the sorted order at $k$ keeps
# an arbitrary 20 of them; `top_k_filter` (and transformers) keeps every token at least as large as the $k$-th
# value, so the result does not depend on how the sort broke ties.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: sampling-topp-minp
# On the real logits at temperature 1, top-p 0.8 and min-p 0.1 keep different sets. Find the first seed at which
# a single draw under each picks a different token.
# ````
#
# ```{solution-start} sampling-topp-minp
# :class: dropdown
# ```

# %%
configs = {
    "top-p": SamplingConfig(do_sample=True, top_p=0.8),
    "min-p": SamplingConfig(do_sample=True, min_p=0.1),
}
scores = {
    name: process_logits(real_logits, real_seen, c) for name, c in configs.items()
}
print(
    {name: f"{int(torch.isfinite(s).sum())} tokens kept" for name, s in scores.items()}
)


def pick(name, seed):
    torch.manual_seed(seed)
    return int(select_next_token(scores[name], configs[name]))


seed = next(s for s in range(1000) if pick("top-p", s) != pick("min-p", s))
print(
    f"seed {seed}: top-p picks {tok.decode(pick('top-p', seed))!r}, "
    f"min-p {tok.decode(pick('min-p', seed))!r}"
)

# %% [markdown]
# Both draw with one `torch.multinomial` on the same seed, so they often agree: the same uniform number falls in
# the same token's slice when the two distributions are similar. They part when it lands where the slices of the
# two renormalised distributions differ.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: sampling-temperature
# How does temperature change how many tokens top-p 0.8 keeps on the real logits? Try $T$ from 0.3 to 2.
# ````
#
# ```{solution-start} sampling-temperature
# :class: dropdown
# ```

# %%
for T in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0):
    nucleus_size = int(
        torch.isfinite(top_p_filter(apply_temperature(real_logits, T), 0.8)).sum()
    )
    print(f"T = {T}: the nucleus holds {nucleus_size:,}")
sizes = [
    int(torch.isfinite(top_p_filter(apply_temperature(real_logits, T), 0.8)).sum())
    for T in (0.3, 2.0)
]
assert sizes[0] <= sizes[1]

# %% [markdown]
# Temperature acts before top-p, so a low $T$ concentrates the mass and the nucleus shrinks, and a high $T$
# spreads it and the nucleus grows. This is why the order of the chain matters.
#
# ```{solution-end}
# ```
