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
# # Draft, then verify
#
# A decode step reads every weight of the model to make one token. Fed five tokens instead of one, the same pass
# reads the same weights and scores five positions. Speculative decoding spends that spare capacity: something
# cheap guesses the next few tokens, and the model checks all the guesses in one pass, keeping those it would
# have chosen itself. Can that change the output? This page builds it and shows that it does not: greedy tokens
# come out identical, and sampled tokens come out with exactly the model's distribution (in exact arithmetic;
# in 16-bit floats a pass over several tokens rounds differently from one over a single token, and a near-tie can
# fall the other way).
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - the draft-and-verify loop, and how rejected guesses leave the KV cache;
# - two drafters: a smaller model of the same family, and *prompt lookup*, which copies from the text so far;
# - the accept/reject rule of Leviathan et al. and Chen et al. (2023), why it keeps the target's distribution
#   exactly, and a chi-square test that tells it apart from a subtly broken rule.
#
# **You need** the KV cache of {doc}`../ch4/02_manual_cache`, sampling as in {doc}`../ch1/03_sampling`, and the
# roofline argument of {doc}`../ch4/05_performance` (decoding streams every weight once per token). It runs on
# the CPU with the embedded model, in about two minutes.
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import speculative as figures
from helpers import model_path, show_source, stamp

import copy
import inspect
import textwrap

import torch

import minqwen
from minqwen.engine import speculative
from minqwen.engine.sampling import SamplingConfig
from minqwen.engine.speculative import (
    PromptLookup,
    SpeculativeDecoder,
    speculative_generate,
)
from minqwen.model.cache import DynamicKVCache
from minqwen.model.config import ModelConfig
from minqwen.tools.stats import chi_square

model = minqwen.Qwen2.from_pretrained(model_path())
tokenizer = minqwen.BPETokenizer.from_file(model_path())
print(stamp())

# %% [markdown]
# ## The loop
#
# Call the model that must decide the output the *target*, and whatever guesses the *drafter*. One round:
#
# 1. the drafter proposes up to $k$ tokens $d_1 \dots d_k$ after the text so far;
# 2. the target runs **once** over the last emitted token and the $k$ drafts. Its logits at position $i$ are its
#    prediction after $d_1 \dots d_i$, exactly what $k+1$ separate decode steps would have given;
# 3. walking left to right, each draft that the target agrees with is kept. At the first disagreement the
#    target's own choice replaces the draft and the round ends; if all $k$ stand, the target's prediction after
#    $d_k$ is a bonus token.
#
# So a round always makes between $1$ and $k+1$ tokens for one pass of the target. The engine keeps one
# invariant: the target's cache holds every token except the last one emitted, which opens the next round's pass.

# %%
show_source(SpeculativeDecoder._tokens)

# %% [markdown]
# The two halves of a round are short. `_draft` asks the drafter for up to $k$ tokens; a model drafter first
# crops its own cache to what still agrees with the text, then feeds the one or two tokens it has not seen.
# `_verify` walks the drafts against the target's logits and returns how many stand and the token that follows
# them; the sampling rule it applies is derived below.

# %%
show_source(speculative._draft)
show_source(speculative._verify)

# %% [markdown]
# ## Rolling back the cache
#
# The verifying pass wrote keys and values for all $k+1$ positions. After it, only the kept drafts may stay:
# `rollback` crops every layer's cache to the length that was accepted. Whatever was rejected is simply
# forgotten, as if it had never been fed.

# %%
show_source(DynamicKVCache.crop)

# %% [markdown]
# A cache that was fed three wrong tokens, then cropped and fed the right ones, gives the logits of a cache that
# only ever saw the right ones:

# %%
prompt, wrong, right = [9707, 11, 1879], [100, 200, 300], [13, 576, 374]
straight = speculative.CachedModel(model)
expected = straight.extend(prompt + right)[len(prompt) :]
rolled = speculative.CachedModel(model)
rolled.extend(prompt)
rolled.extend(wrong)
rolled.rollback(len(prompt))
difference = (rolled.extend(right) - expected).abs().max().item()
assert difference < 1e-4
print("the logits after the rollback equal those of the straight run, to within 1e-4")

# %% [markdown]
# The difference is rounding: a pass over three tokens and one over six sum in different orders.

# %% [markdown]
# ## Greedy: the target's own tokens
#
# Under greedy decoding "the target agrees" means the draft is the target's argmax (after the repetition penalty,
# which reads the drafts before position $i$ as part of the text). So every emitted token is the target's argmax
# given the tokens before it, which is the definition of its greedy output, whatever the drafter guessed.
#
# Two drafters run here. A quantized copy of the embedded model (int8 weights, {doc}`../ch6/02_int8_weights`)
# stands in for a small model of the same family; being nearly the same model, it is here to show correctness,
# not speed. The other is prompt lookup, which is below. The prompt asks for a rename across a function from
# Python's own `textwrap`, so the answer will repeat the prompt:

# %%
source = inspect.getsource(textwrap.dedent)
request = (
    "Rename the variable `margin` to `common_prefix` everywhere in this function, and return the "
    f"whole function.\n\n```python\n{source}```"
)
chat = minqwen.render_chat(
    [{"role": "user", "content": request}], add_generation_prompt=True
)
ids = torch.tensor([tokenizer.encode(chat)])
int8_draft = minqwen.quantize(copy.deepcopy(model), "int8")
alone = minqwen.generate(model, ids, 48, do_sample=False)
runs = {}
for name, draft in (("int8 copy", int8_draft), ("prompt lookup", "prompt-lookup")):
    tokens, runs[name] = speculative_generate(
        model, draft, ids, 48, num_draft_tokens=4, do_sample=False, return_stats=True
    )
    assert torch.equal(tokens, alone)
answer = tokenizer.decode(alone[0, ids.shape[1] :].tolist())
print("\n".join(textwrap.fill(line, 88) for line in answer.splitlines()))

# %% tags=["hide-input"]
figures.stats_table(runs)

# %% [markdown]
# Both give the target's 48 tokens exactly. The int8 copy agreed with every one of its drafts here. Prompt lookup
# was wrong three times in four, because these first tokens explain the change before the code begins, so most of
# its rounds rolled the cache back; the tokens are the target's all the same. A round is one pass of the target;
# the prefill makes the first token, so without speculation 48 tokens take 48 passes. The
# {doc}`next page <02_acceptance_and_speed>` measures what the passes saved are worth in time.

# %% [markdown]
# ## Prompt lookup
#
# A drafter need not be a model. When the answer repeats the question (an edit, a refactor, a summary quoting
# its source), the next tokens are often what followed the last few tokens the previous time they occurred.
# Prompt lookup (Saxena, 2023) looks up the last $n$ tokens earlier in the text, longest match first, and
# proposes what came after. It costs no forward pass; where nothing repeats, it proposes nothing and the round
# is a plain decode step.

# %%
show_source(PromptLookup.propose)

# %%
lookup = PromptLookup()
text = (
    "for indent in indents:\n    if margin is None:\n        margin = indent\n\n"
    "# renamed\nfor indent in indents:\n    if"
)
proposal = tokenizer.decode(lookup.propose(tokenizer.encode(text), 8))
print(repr(proposal))
assert proposal == " margin is None:\n        margin = indent"

# %% [markdown]
# The last three tokens, `indents:` and `if`, occurred before, and what followed them is the guess. In a rename
# it guesses the old name: the target rejects `margin`, writes `common_prefix` itself, and the copying resumes
# after it.

# %% [markdown]
# ## Sampling: accept with probability $\min(1, p/q)$
#
# With sampling, "the target agrees" cannot mean equality: the target would have drawn a token at random. Let
# $p$ be the target's distribution at a position (after temperature, top-k and top-p) and $q$ the drafter's,
# from which the draft $x$ was drawn. The rule of Leviathan et al. and Chen et al. (2023):
#
# - accept $x$ with probability $\min\left(1, \dfrac{p(x)}{q(x)}\right)$;
# - otherwise draw a replacement from the **residual** $r(y) = \dfrac{\max(p(y) - q(y), 0)}{\sum_z \max(p(z) -
#   q(z), 0)}$, and end the round.
#
# Why the emitted token has distribution exactly $p$: the chance of emitting $y$ by acceptance is
# $q(y)\min(1, p(y)/q(y)) = \min(p(y), q(y))$. A rejection happens with probability
# $\beta = 1 - \sum_z \min(p(z), q(z)) = \sum_z \max(p(z) - q(z), 0)$, the normalizer of the residual. So
#
# $$
# P(\text{emit } y) = \min(p(y), q(y)) + \beta \, r(y) = \min(p(y), q(y)) + \max(p(y) - q(y), 0) = p(y).
# $$
#
# The same holds at every later position, given the tokens before it, so the whole sequence has the target's
# distribution. The acceptance rate is $1 - \beta$: one minus the total variation distance between $p$ and $q$.
# A drafter that copies is the case $q = \delta_x$: $x$ is accepted with probability $p(x)$, and a rejection draws
# from $p$ with $x$ removed.

# %%
show_source(speculative.accept_or_resample)
show_source(speculative.residual)

# %% [markdown]
# ### Checked by counting
#
# Equal tokens cannot show a sampler right; counts can. Two small random models stand in for target and drafter
# here, because their distributions are far apart, which is where a wrong rule shows. At one fixed prefix, 20,000
# rounds each draw a draft from $q$ and apply the rule; Pearson's chi-square test ({doc}`../ch1/03_sampling`) asks
# whether the emitted tokens follow $p$. Then the same test runs on a rule with one plausible bug: a rejection
# redraws from $p$ instead of the residual.


# %% tags=["hide-input"]
def random_model(seed: int) -> minqwen.Qwen2:
    config = ModelConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(seed)
    return minqwen.Qwen2(config).eval()


def distribution(model, context, sampling):
    logits = speculative.CachedModel(model).extend(context)[-1]
    return speculative._probabilities(logits, context, sampling)


def emitted_counts(p, q, rounds: int = 20_000):
    torch.manual_seed(0)
    counts = torch.zeros_like(p)
    for _ in range(rounds):
        draft = int(torch.multinomial(q, 1))
        replacement = speculative.accept_or_resample(p, q, draft)
        counts[draft if replacement is None else replacement] += 1
    return counts


# %%
sampling = SamplingConfig(do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
context = [5, 17, 42, 8, 30]
p = distribution(random_model(0), context, sampling)
q = distribution(random_model(1), context, sampling)
right = emitted_counts(p, q)
speculative_residual = speculative.residual
speculative.residual = lambda p, q: p  # the bug: redraw from p
try:
    broken = emitted_counts(p, q)
finally:
    speculative.residual = speculative_residual
p_right, p_broken = chi_square(right, p)[2], chi_square(broken, p)[2]
print(f"total variation between p and q: {0.5 * (p - q).abs().sum():.2f}")
print(f"chi-square p-value: the rule {p_right:.2f}; redrawing from p {p_broken:.1e}")
assert p_right > 0.01 and p_broken < 1e-6

# %% tags=["hide-input"]
figures.rule_counts(p, q, right, broken)

# %% [markdown]
# The broken rule over-produces the tokens the drafter likes: accepted drafts already gave them their share, and
# the redraw from $p$ adds more. The residual is what takes that back.

# %% [markdown]
# ## Summary
#
# - Speculative decoding drafts $k$ tokens cheaply and verifies them in one pass of the target, which costs
#   about one decode step where decoding is bound by reading the weights.
# - Rejected drafts leave the cache by cropping it to the accepted length.
# - Greedy: a draft stands only if it is the target's argmax, so the output is the target's greedy output,
#   token for token, here on real weights with two different drafters.
# - Sampling: accept with probability $\min(1, p/q)$, else redraw from the residual $\max(p-q, 0)$. The emitted
#   token has distribution $p$ exactly; the acceptance rate is $1 - \mathrm{TV}(p, q)$.
# - Prompt lookup drafts by copying from the text itself and costs nothing; it pays when the answer repeats the
#   prompt.
#
# ## Exercises
#
# ````{exercise}
# :label: spec-expected-length
# If each draft is accepted independently with probability $\alpha$, how many tokens does a round with $k$
# drafts make on average? Compare the formula with a simulation for $\alpha = 0.8$, $k = 4$.
# ````
#
# ```{solution-start} spec-expected-length
# :class: dropdown
# ```
#
# The round makes $j + 1$ tokens when the first $j$ drafts stand and draft $j+1$ falls (or $j = k$). Summing,
# $E = \sum_{j=0}^{k} \alpha^j = \dfrac{1 - \alpha^{k+1}}{1 - \alpha}$.

# %%
alpha, k = 0.8, 4
formula = (1 - alpha ** (k + 1)) / (1 - alpha)
generator = torch.Generator().manual_seed(0)
stands = torch.rand(100_000, k, generator=generator) < alpha
accepted = torch.where(stands.all(1), k, (~stands).float().argmax(1))
simulated = (accepted + 1).float().mean().item()
print(f"formula {formula:.3f}, simulation {simulated:.3f}")
assert abs(formula - simulated) < 0.02

# %% [markdown]
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: spec-own-draft
# What happens when the target drafts for itself, sampling at the Instruct defaults? Predict the acceptance rate
# from the rule, then measure it.
# ````
#
# ```{solution-start} spec-own-draft
# :class: dropdown
# ```
#
# With $q = p$ the ratio $p/q$ is 1, so every draft stands (up to the rounding between a pass over one token
# and a pass over several). Nothing is saved, of course: each draft costs a full step of the same model.

# %%
_, own = speculative_generate(
    model, model, ids, 24, num_draft_tokens=4, seed=0, return_stats=True
)
print(f"acceptance rate {own.acceptance_rate:.0%} over {own.drafted} drafts")
assert own.acceptance_rate > 0.9

# %% [markdown]
# ```{solution-end}
# ```
