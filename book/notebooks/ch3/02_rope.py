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
# # Rotary position embeddings
#
# Attention on its own cannot tell word order: it compares every query with every key the same way wherever they
# stand. Qwen2 tells it positions by *rotating* each query and key vector by an angle that grows with the
# position. Why does a rotation make the score of two tokens depend on their distance only, how do the
# frequencies and the cos/sin tables come out bit for bit as transformers computes them, and how does YaRN stretch
# the scheme past the 32k positions the model was trained on?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how {term}`RoPE` rotates each pair of a head's channels by $m\theta_i$, and why $q_m \cdot k_n$ then
#   depends on $m - n$ only;
# - the frequencies $\theta_i$, the cos/sin tables and the "rotate half" form, checked against transformers;
# - how far float32 tables drift from exact arithmetic over 32k positions;
# - how {term}`YaRN` blends interpolated and original frequencies to reach 128k positions.
#
# **You need** where RoPE sits in a decoder layer, from {doc}`../ch2/01_architecture`. The page reads only the
# model's `config.json` and builds a tiny random model at the end: it runs in seconds.
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import rope as figures
from helpers import diff_table, model_path, show_source, table

import copy
import json
import math
import tempfile
import warnings

import torch
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

import minqwen
from minqwen.model.config import ModelConfig
from minqwen.model.rope import (
    apply_rope,
    default_inv_freq,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
    yarn_inv_freq,
)

_ = torch.manual_seed(0)

# %% [markdown]
# ## One rotation per pair of channels
#
# A head has $d$ channels. RoPE groups them into $d/2$ pairs and, for the token at position $m$, turns pair $i$
# by the angle $m\theta_i$. In Qwen2's layout pair $i$ is channel $i$ with channel $i + d/2$ (the section on
# rotate half says why):
#
# $$
# \begin{pmatrix} x'_i \\ x'_{i+d/2} \end{pmatrix} =
# \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
# \begin{pmatrix} x_i \\ x_{i+d/2} \end{pmatrix},
# \qquad
# \theta_i = b^{-2i/d}, \quad i = 0, \dots, d/2 - 1.
# $$
#
# The base $b$ is `rope_theta`. Qwen2.5 uses $b = 10^6$ (the RoPE paper used $10^4$) and was trained on
# 32,768 positions:

# %%
config = ModelConfig.from_file(model_path())
print(
    f"b = {config.rope_theta:g}, d = {config.head_dim}, trained positions "
    f"{config.max_position_embeddings:,}, rope type {config.rope_type!r}"
)

# %% tags=["hide-input"]
hf_config = AutoConfig.from_pretrained(model_path())
read_by = table(
    {
        "minqwen": [
            config.rope_theta,
            config.max_position_embeddings,
            config.head_dim,
            config.rope_type,
        ],
        "transformers": [
            hf_config.rope_parameters["rope_theta"],
            hf_config.max_position_embeddings,
            hf_config.hidden_size // hf_config.num_attention_heads,
            hf_config.rope_parameters["rope_type"],
        ],
    },
    index=["rope_theta", "max_position_embeddings", "head_dim", "rope type"],
)
agree = (read_by["minqwen"] == read_by["transformers"]).sum()
print(f"transformers reads the same values from config.json: {agree}/{len(read_by)}")
assert agree == len(read_by)
assert config.rope_theta == hf_config.rope_parameters["rope_theta"] == 1_000_000.0
assert config.max_position_embeddings == hf_config.max_position_embeddings == 32768
assert config.rope_type == "default"

# %% [markdown]
# ## The frequencies
#
# `default_inv_freq` is $\theta_i = b^{-2i/d}$, one line: `exponents` holds $2i/d$, and the return value is
# $1 / b^{2i/d}$.

# %%
show_source(default_inv_freq)

# %% [markdown]
# The result is compared with transformers' `Qwen2RotaryEmbedding` and with the formula evaluated in float64:

# %%
inv_freq, scale = rope_inv_freq(config)
rotary = Qwen2RotaryEmbedding(hf_config)
exact = 1.0 / torch.tensor(config.rope_theta, dtype=torch.float64) ** (
    torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
)
relative = ((inv_freq.double() - exact).abs() / exact).max().item()
print(
    f"{int((inv_freq == rotary.inv_freq).sum())}/{len(inv_freq)} frequencies equal to "
    f"transformers'; max relative error against float64 {relative:.1e} "
    f"(2⁻²³ = {2**-23:.1e})"
)
assert torch.equal(inv_freq, rotary.inv_freq)
assert scale == rotary.attention_scaling == 1.0
assert relative < 2**-23
assert (inv_freq.double() - exact).abs().max() < 1e-5

# %% tags=["remove-input", "hide-output"]
diff_table(
    {
        "ours vs HF": (inv_freq, rotary.inv_freq),
        "ours vs float64 formula": (inv_freq, exact),
    }
)

# %% [markdown]
# Pair $i$ completes a turn every $2\pi/\theta_i = 2\pi\, b^{2i/d}$ positions. Pair 0 turns once every
# $2\pi \approx 6.3$ positions; the last pair so slowly that a turn takes far longer than any context (left).
# On the right, $\cos(m\theta_i)$ over the first positions: the fast pairs tell neighbours apart, the slow ones
# barely move and carry coarse position across the whole context.

# %% tags=["hide-input"]
positions = torch.arange(config.max_position_embeddings)[None]
pairs = config.head_dim // 2
cos, sin = rope_cos_sin(inv_freq, positions)
figures.frequencies(inv_freq, cos[0], config.max_position_embeddings)

# %% [markdown]
# ## The cos/sin tables
#
# The model never stores angles. For the positions it is given, `rope_cos_sin` computes $m\theta_i$ in float32,
# takes cos and sin, and casts them to the working dtype. Both halves of the head repeat the same $d/2$ angles,
# one per pair:

# %%
show_source(rope_cos_sin)

# %% tags=["hide-input"]
hf_cos, hf_sin = rotary(torch.zeros(1), positions)
angles = positions[0, :, None].double() * exact
error = (cos[0, :, :pairs].double() - angles.cos()).abs().amax(-1)
# rounding inv_freq and the product each costs at most half an ulp, relative: a bound linear in the position
bound = positions[0].double() * exact[0] * 2**-23 + 1e-6
first = 128
print(
    f"cos and sin over {positions.shape[1]:,} positions equal to transformers': "
    f"{torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)}\n"
    f"against float64: max error {error[:first].max():.1e} over the first {first} "
    f"positions, {error.max():.1e} over all"
)
assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
assert error[:first].max() < 1e-5
assert (error <= bound).all()

# %% tags=["remove-input", "hide-output"]
diff_table(
    {
        "cos, ours vs HF": (cos, hf_cos),
        "sin, ours vs HF": (sin, hf_sin),
        "cos, ours vs float64": (cos[0, :, :pairs], angles.cos()),
        "sin, ours vs float64": (sin[0, :, :pairs], angles.sin()),
    }
)

# %% [markdown]
# Against transformers the whole table is identical. Against exact arithmetic it is not, and the error grows
# with the position: the angle $m\theta_0$ is a float32 number, whose spacing near 30,000 is about 0.002
# radians, so each rounding of it moves cos by up to that much. Every float32 implementation carries this error
# and the model was trained with it; what matters here is to reproduce it exactly.

# %% tags=["hide-input"]
figures.table_error(error, bound, 1e-5)

# %% [markdown]
# ## Applying it: rotate half
#
# Written over the whole head at once, the rotation of every pair is two element-wise products:
#
# $$
# \operatorname{RoPE}_m(x) = x \odot \cos(m\boldsymbol\theta) + \operatorname{rotate\_half}(x) \odot
# \sin(m\boldsymbol\theta),
# \qquad
# \operatorname{rotate\_half}(a, b) = (-b, a),
# $$
#
# where $a$ and $b$ are the two halves of $x$ and $\boldsymbol\theta$ repeats $\theta_0, \dots, \theta_{d/2-1}$
# over both halves, as `rope_cos_sin` builds it. Channel $i$ of the result is
# $x_i \cos m\theta_i - x_{i+d/2} \sin m\theta_i$ and channel $i + d/2$ is
# $x_{i+d/2} \cos m\theta_i + x_i \sin m\theta_i$: the rotation matrix above. `rotate_half` is the
# $(-b, a)$, `apply_rope` the sum of products.

# %%
show_source(rotate_half)
show_source(apply_rope)

# %%
q = torch.randn(1, config.num_attention_heads, 9, config.head_dim)
k = torch.randn(1, config.num_key_value_heads, 9, config.head_dim)
cos9, sin9 = rope_cos_sin(inv_freq, torch.arange(100, 109)[None])
hf_q, hf_k = apply_rotary_pos_emb(q, k, cos9, sin9)
ours_q, ours_k = apply_rope(q, cos9, sin9), apply_rope(k, cos9, sin9)
print(
    "apply_rope equals transformers' apply_rotary_pos_emb:",
    torch.equal(ours_q, hf_q) and torch.equal(ours_k, hf_k),
)
assert torch.equal(ours_q, hf_q) and torch.equal(ours_k, hf_k)
torch.testing.assert_close(
    ours_q.norm(dim=-1), q.norm(dim=-1)
)  # rotations keep lengths

# %% [markdown]
# ## Why the score depends on the distance only
#
# Call $R_m$ the rotation of all pairs at position $m$. A rotation's transpose is the rotation backwards,
# $R_m^\top = R_{-m}$, and rotations of a pair by two angles add up, $R_{-m}R_n = R_{n-m}$. So the score between
# the query at position $m$ and the key at position $n$ is
#
# $$
# (R_m q)^\top (R_n k) = q^\top R_m^\top R_n\, k = q^\top R_{n-m}\, k,
# $$
#
# a function of $n - m$ alone. Below, one query and one key placed at every combination of 64 positions: each
# diagonal of the grid is constant, and plotted against the distance every row falls on the same curve.

# %%
one_q, one_k = torch.randn(config.head_dim), torch.randn(config.head_dim)
grid = torch.arange(64)
cos_grid, sin_grid = rope_cos_sin(inv_freq, grid[None])
rotated_q = apply_rope(one_q.expand(1, 1, len(grid), -1), cos_grid, sin_grid)[0, 0]
rotated_k = apply_rope(one_k.expand(1, 1, len(grid), -1), cos_grid, sin_grid)[0, 0]
scores = rotated_q @ rotated_k.T
for offset in (-20, 0, 7, 40):
    diagonal = scores.diagonal(offset)
    assert (diagonal - diagonal[0]).abs().max() < 1e-4 * scores.abs().max()

# %% tags=["hide-input"]
figures.distance_scores(scores)

# %% [markdown]
# ## YaRN: stretching the context
#
# Past the trained 32,768 positions the slow pairs reach angles they never saw in training. Qwen2.5's model
# cards extend the context to 128k with
# `"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`. With factor
# $s$, YaRN divides the slow pairs' frequencies by $s$, so $s$ times the original context $L$ maps onto angles
# seen in training; keeps the fast pairs, which already turn many times within $L$ and would blur neighbours if
# slowed; and blends linearly in between:
#
# $$
# \theta'_i = (1 - r_i)\,\theta_i + r_i\,\frac{\theta_i}{s},
# \qquad
# r_i = \operatorname{clamp}\!\left(\frac{i - \ell}{h - \ell},\, 0,\, 1\right).
# $$
#
# The ramp $r_i$ runs from pair $\ell$ to pair $h$, the pairs that complete $\beta_\text{fast} = 32$ and
# $\beta_\text{slow} = 1$ turns within the original context. Pair $i$ completes $\beta$ turns when its wavelength is $L/\beta$,
# that is at
#
# $$
# i(\beta) = \frac{d}{2} \cdot \frac{\ln\big(L / (2\pi\beta)\big)}{\ln b},
# $$
#
# with $\ell = \lfloor i(\beta_\text{fast}) \rfloor$ and $h = \lceil i(\beta_\text{slow}) \rceil$. Finally YaRN
# multiplies cos and sin by the attention factor
#
# $$
# a = 0.1 \ln s + 1,
# $$
#
# so every score $q^\top k$ grows by $a^2$, which sharpens the softmax that a longer context flattens. In
# `yarn_inv_freq`, `channel_of` is $i(\beta)$, `ramp` is $r_i$, `kept` is $1 - r_i$, and
# `_yarn_attention_factor` returns $a$.

# %%
show_source(yarn_inv_freq)

# %% [markdown]
# The same config as above with the model card's scaling added, read by transformers and by minqwen. Qwen's
# released configs keep `max_position_embeddings` at 32,768: the factor, not that field, sets the stretch.

# %% tags=["hide-input"]
# the layout of Qwen's released config.json files: rope_theta at the top, the card's rope_scaling beside it
yarn_json = json.loads(model_path().joinpath("config.json").read_text())
# transformers 5 writes rope_parameters; released files keep the older layout
yarn_json.pop("rope_parameters", None)
yarn_json |= {
    "rope_theta": config.rope_theta,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    },
}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # transformers edits the dicts it is given
    hf_yarn_config = Qwen2Config(**copy.deepcopy(yarn_json))
    hf_yarn, hf_yarn_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_yarn_config)
yarn_rotary = Qwen2RotaryEmbedding(hf_yarn_config)

# %%
yarn_config = ModelConfig.from_dict(yarn_json)
yarn, yarn_scale = rope_inv_freq(yarn_config)
print(yarn_config.rope_scaling)
print(
    f"θ′ equal to transformers': {torch.equal(yarn, hf_yarn)}; "
    f"a = {yarn_scale:.4f} (transformers {hf_yarn_scale:.4f})"
)
assert torch.equal(yarn, hf_yarn)
assert (
    yarn_config.rope_theta
    == hf_yarn_config.rope_parameters["rope_theta"]
    == 1_000_000.0
)
assert yarn_scale == hf_yarn_scale == 0.1 * math.log(4.0) + 1.0

# %% tags=["hide-input"]
far = torch.arange(0, 4 * 32768, 512)[None]
same_tables = all(
    torch.equal(a, b)
    for a, b in zip(
        rope_cos_sin(yarn, far, yarn_scale), yarn_rotary(torch.zeros(1), far)
    )
)
print(
    f"YaRN cos/sin tables up to position {far.max().item():,} equal to transformers': "
    f"{same_tables}"
)
assert same_tables

# %% [markdown]
# The ratio $\theta'_i / \theta_i$ pair by pair is the ramp, read off the frequencies: 1 for the fast pairs,
# $1/s$ for the slow ones, a straight line between.

# %%
ratio = yarn / inv_freq
kept = (ratio == 1).sum().item()
slowed = torch.isclose(ratio, torch.tensor(0.25)).sum().item()
print(f"{kept} pairs kept, {slowed} slowed by 4, {pairs - kept - slowed} blended")
assert kept > 0 and slowed > 0

# %% tags=["hide-input"]
figures.yarn_ratio(ratio, 4.0)

# %% [markdown]
# Finally a whole model with YaRN: a tiny random Qwen2 with the scaling on (its "original" context is 64
# positions), run by transformers and by minqwen over 200 positions.

# %% tags=["hide-input"]
tiny = Qwen2Config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)
tiny_hf = Qwen2ForCausalLM(tiny).eval()
with tempfile.TemporaryDirectory() as folder:
    tiny_hf.save_pretrained(folder)
    tiny_ours = minqwen.Qwen2.from_pretrained(folder)
ids = torch.randint(0, 128, (1, 200))
with torch.no_grad():
    tiny_diff = diff_table(
        {"YaRN tiny model logits": (tiny_ours(ids), tiny_hf(ids).logits)}
    )
tiny_error = float(tiny_diff.loc["YaRN tiny model logits", "max_rel"])
print(
    f"tiny YaRN model, 200 positions: minqwen's logits against transformers', "
    f"max relative difference {tiny_error:.1e}"
)
assert tiny_ours.rope_scale == yarn_rotary.attention_scaling
assert tiny_error <= 1e-5

# %% [markdown]
# ## Summary
#
# - RoPE rotates pair $i$ of each query and key channel by $m\theta_i$, with $\theta_i = b^{-2i/d}$ and
#   $b = 10^6$ for Qwen2.5; nothing is added to the token's vector and nothing is learned.
# - Because $R_m^\top R_n = R_{n-m}$, the score $q_m \cdot k_n$ depends on the distance $n - m$ only.
# - Qwen2 pairs channel $i$ with $i + d/2$ and applies the rotation as $x \cos + \operatorname{rotate\_half}(x)
#   \sin$; minqwen's frequencies, tables and rotation are transformers' bit for bit.
# - The float32 tables drift from exact arithmetic in proportion to the angle; the model was trained with that
#   drift, so reproducing it exactly is what counts.
# - YaRN keeps the fast pairs, slows the slow ones by the factor $s$, ramps in between, and scales the scores by
#   $(0.1 \ln s + 1)^2$.
#
# ## Exercises
#
# ````{exercise}
# :label: rope-shift
# Place one query and one key at positions $(m, n) = (7, 3)$, then shift both by 1,000 and by 20,000. Show that
# the score does not change beyond float32 rounding, while moving only the key by one position does change it.
# ````
#
# ```{solution-start} rope-shift
# :class: dropdown
# ```


# %%
def score(m, n):
    """q·k after rotating the query to position m and the key to position n."""
    cos_, sin_ = rope_cos_sin(inv_freq, torch.tensor([[m, n]]))
    rq = apply_rope(one_q.expand(1, 1, 2, -1), cos_, sin_)[0, 0, 0]
    rk = apply_rope(one_k.expand(1, 1, 2, -1), cos_, sin_)[0, 0, 1]
    return (rq @ rk).item()


for shift in (0, 1_000, 20_000):
    print(
        f"(m, n) = ({7 + shift}, {3 + shift}): q·k = {score(7 + shift, 3 + shift):.4f}"
    )
print(f"(m, n) = (7, 4): q·k = {score(7, 4):.4f}")
assert abs(score(1007, 1003) - score(7, 3)) < 1e-4 * abs(score(7, 3)) + 1e-4
assert abs(score(20_007, 20_003) - score(7, 3)) < 1e-2
assert abs(score(7, 4) - score(7, 3)) > 0.1

# %% [markdown]
# The score at $(7, 3)$ and at the shifted positions is the same function of the distance 4. The larger shift
# differs in the last digits: the angle $20{,}007\,\theta_0$ is rounded to float32 with a spacing of about 0.002
# radians, the drift the table-error figure shows. Moving the key by one changes the distance, and the score.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: rope-interleaved
# The RoPE paper and GPT-J pair *neighbouring* channels $(2i, 2i+1)$ instead of $(i, i + d/2)$. Write the
# interleaved rotation, find the permutation of channels that turns one layout into the other, and show that
# the attention scores of the two agree once the queries and keys are permuted, and differ without it.
# ````
#
# ```{solution-start} rope-interleaved
# :class: dropdown
# ```


# %%
def apply_rope_interleaved(x, angles):
    """Rotate channels (2i, 2i+1) by angles[..., i]: the RoPE paper's layout."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos_, sin_ = angles.cos(), angles.sin()
    rotated = [even * cos_ - odd * sin_, even * sin_ + odd * cos_]
    return torch.stack(rotated, dim=-1).flatten(-2)


# rotate-half channel j holds interleaved channel to_half[j]: the evens, then the odds
to_half = torch.cat(
    [torch.arange(0, config.head_dim, 2), torch.arange(1, config.head_dim, 2)]
)
print("first half:", to_half[:6].tolist(), "to", to_half[pairs - 1].item())
print("second half:", to_half[pairs : pairs + 6].tolist(), "to", to_half[-1].item())

positions9 = torch.arange(100, 109)
angles9 = positions9[:, None].float() * inv_freq
q1, k1 = torch.randn(9, config.head_dim), torch.randn(9, config.head_dim)
interleaved = (
    apply_rope_interleaved(q1, angles9) @ apply_rope_interleaved(k1, angles9).T
)
cos_h, sin_h = rope_cos_sin(inv_freq, positions9[None])
half_q = apply_rope(q1[None, None, :, to_half], cos_h, sin_h)[0, 0]
half_k = apply_rope(k1[None, None, :, to_half], cos_h, sin_h)[0, 0]
half_scores = half_q @ half_k.T
unpermuted = (
    apply_rope(q1[None, None], cos_h, sin_h)[0, 0]
    @ apply_rope(k1[None, None], cos_h, sin_h)[0, 0].T
)
permuted_error = (half_scores - interleaved).abs().max() / interleaved.abs().max()
print(
    f"permuted rotate half vs interleaved: max relative difference {permuted_error:.1e}"
)
print(f"without the permutation: {(unpermuted - interleaved).abs().max():.2f}")
assert permuted_error < 1e-5
assert not torch.allclose(unpermuted, interleaved, atol=1e-3)

# %% [markdown]
# The two layouts are the same rotation applied to different orderings of the channels, so the scores agree to
# float32 rounding (the dot products sum in another order). That is why a checkpoint trained with one layout runs
# under the other once the rows of `q_proj` and `k_proj`, and their biases, are permuted by `to_half`: the
# conversion scripts from Meta's original Llama weights do exactly that. Qwen2's checkpoints are already in the
# rotate-half order, so minqwen loads them as they are.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: rope-attention-factor
# YaRN multiplies cos and sin by $a$. Show on a query and a key rotated with the YaRN tables that every score is
# multiplied by $a^2$, and print $a$ and $a^2$ for the factors 2, 4 and 8.
# ````
#
# ```{solution-start} rope-attention-factor
# :class: dropdown
# ```

# %%
near = torch.arange(0, 64)[None]
plain_tables, scaled_tables = (
    rope_cos_sin(yarn, near),
    rope_cos_sin(yarn, near, yarn_scale),
)
q64, k64 = (
    torch.randn(1, 1, 64, config.head_dim),
    torch.randn(1, 1, 64, config.head_dim),
)
plain = apply_rope(q64, *plain_tables) @ apply_rope(k64, *plain_tables).transpose(
    -1, -2
)
scaled = apply_rope(q64, *scaled_tables) @ apply_rope(k64, *scaled_tables).transpose(
    -1, -2
)
ratios = scaled / plain
print(f"scaled / plain scores: median {ratios.median():.4f}, a² = {yarn_scale**2:.4f}")
torch.testing.assert_close(scaled, plain * yarn_scale**2, rtol=1e-5, atol=1e-5)
for s in (2, 4, 8):
    _, a = yarn_inv_freq(config.head_dim, config.rope_theta, {"factor": s}, 32768)
    print(f"s = {s}: a = {a:.3f}, scores x {a * a:.3f}")

# %% [markdown]
# Both the query and the key carry a factor $a$, so their product carries $a^2$: at $s = 4$ the logits of
# attention are about 30% larger, which keeps the softmax about as peaked over 128k positions as it was over 32k.
#
# ```{solution-end}
# ```
