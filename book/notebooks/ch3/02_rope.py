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
# Attention on its own cannot tell word order: it compares every query with every key the same way wherever
# they stand. Qwen2 tells it positions by *rotating* each query and key vector. The head's 64 channels form 32
# pairs; pair `i` turns by the angle `position x inv_freq[i]`. A dot product of two rotated vectors then depends
# on the *difference* of their positions only, which is exactly what attention needs.
#
# This chapter builds the frequencies and the cos/sin tables, checks them bit for bit against transformers',
# shows why the "rotate half" layout is the same thing as the paper's interleaved pairs, and ends with YaRN, the
# stretch that Qwen2.5 uses for contexts past 32k.

# %%
# %matplotlib inline
from helpers import diff_table, model_path, show_source, table

import copy
import json
import math
import warnings

import matplotlib.pyplot as plt
import torch
from transformers import AutoConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import logging as hf_logging

from minqwen.config import ModelConfig
from minqwen.rope import (
    apply_rope,
    default_inv_freq,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
    yarn_inv_freq,
)

hf_logging.disable_progress_bar()
torch.manual_seed(0)
config = ModelConfig.from_file(model_path())
hf_config = AutoConfig.from_pretrained(model_path())
table(
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

# %% [markdown]
# Qwen2.5 uses a large base, `rope_theta = 1e6` (the original RoPE paper used 1e4), and was trained on 32,768
# positions. Both readers of `config.json` agree:

# %%
assert config.rope_theta == hf_config.rope_parameters["rope_theta"] == 1_000_000.0
assert config.max_position_embeddings == hf_config.max_position_embeddings == 32768
assert config.rope_type == "default"

# %% [markdown]
# ## The frequencies
#
# Pair `i` of a `d`-channel head turns at `inv_freq[i] = theta^(-2i/d)` radians per position: pair 0 once per
# radian, the last pair so slowly that it completes a turn only every `2 pi theta^((d-2)/d)` positions.

# %%
show_source(default_inv_freq)

# %%
inv_freq, scale = rope_inv_freq(config)
rotary = Qwen2RotaryEmbedding(hf_config)
exact = 1.0 / torch.tensor(config.rope_theta, dtype=torch.float64) ** (
    torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
)
diff_table(
    {
        "ours vs HF": (inv_freq, rotary.inv_freq),
        "ours vs float64 formula": (inv_freq, exact),
    }
)

# %% [markdown]
# Ours and HF's are the same float32 numbers, bit for bit; both sit within float32 rounding of the exact formula.

# %%
assert torch.equal(inv_freq, rotary.inv_freq)
assert scale == rotary.attention_scaling == 1.0
assert ((inv_freq.double() - exact).abs() / exact).max() < 2**-23
assert (inv_freq.double() - exact).abs().max() < 1e-5

# %% [markdown]
# ## The cos/sin tables
#
# The model never stores angles; it computes `cos` and `sin` of `position x inv_freq` for the positions it is
# given, in float32, then casts them to the working dtype. Both halves of the head repeat the same 32 angles
# (why is the subject of the next section).

# %%
show_source(rope_cos_sin)

# %%
positions = torch.arange(config.max_position_embeddings)[None]
pairs = config.head_dim // 2
cos, sin = rope_cos_sin(inv_freq, positions)
hf_cos, hf_sin = rotary(torch.zeros(1), positions)
angles = positions[0, :, None].double() * exact
diff_table(
    {
        "cos, ours vs HF": (cos, hf_cos),
        "sin, ours vs HF": (sin, hf_sin),
        "cos, ours vs float64": (cos[0, :, :pairs], angles.cos()),
        "sin, ours vs float64": (sin[0, :, :pairs], angles.sin()),
    }
)

# %% [markdown]
# Against HF the whole 32,768-position table is identical. Against exact arithmetic it is not, and the error grows
# with position: the angle `position x inv_freq` is a float32 number, whose spacing near 30,000 is about 0.002
# radians. So RoPE in float32 is accurate to 1e-5 only for the first hundred or so positions of the fastest
# pairs. Every float32 implementation carries this error and the model was trained with it; what matters for
# us is that we reproduce it exactly.

# %%
assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
error = (cos[0, :, :pairs].double() - angles.cos()).abs().amax(-1)
first = 128
assert error[:first].max() < 1e-5
# rounding inv_freq and the product each costs at most half an ulp, relative: a bound linear in the position
assert (error <= positions[0].double() * exact[0] * 2**-23 + 1e-6).all()

fig, ax = plt.subplots()
ax.loglog(positions[0, 1:], error[1:], lw=0.5)
ax.axhline(1e-5, color="gray", ls="--", label="1e-5")
ax.set(
    xlabel="position",
    ylabel="max |cos - exact| over pairs",
    title="float32 RoPE tables against exact arithmetic",
)
ax.legend()
plt.show()

# %% [markdown]
# ## What the rotation looks like
#
# Left: the wavelength of each pair, from 6 positions (pair 0) to millions (pair 31). Right: `cos(angle)` for
# the first 256 positions; the fast pairs (bottom rows) spin, the slow ones (top rows) barely move, so they can
# carry coarse position across the whole context.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
left.semilogy(2 * math.pi / inv_freq, marker=".")
left.axhline(
    config.max_position_embeddings, color="gray", ls="--", label="32,768 positions"
)
left.set(xlabel="pair i", ylabel="wavelength (positions)", title="2 pi / inv_freq")
left.legend()
image = right.imshow(
    cos[0, :256, :pairs].T,
    aspect="auto",
    cmap="RdBu",
    vmin=-1,
    vmax=1,
    origin="lower",
    interpolation="nearest",
)
right.set(xlabel="position", ylabel="pair i", title="cos(position x inv_freq)")
fig.colorbar(image, ax=right)
plt.show()

# %% [markdown]
# ## Applying it: rotate half
#
# With `(a, b)` a pair of channels, the rotation by `angle` is `(a cos - b sin, a sin + b cos)`. Written over the
# whole head at once that is `x cos + rotate_half(x) sin`, where `rotate_half` maps `(a, b)` to `(-b, a)` pair by
# pair.

# %%
show_source(rotate_half)
show_source(apply_rope)

# %%
q = torch.randn(1, config.num_attention_heads, 9, config.head_dim)
k = torch.randn(1, config.num_key_value_heads, 9, config.head_dim)
cos9, sin9 = rope_cos_sin(inv_freq, torch.arange(100, 109)[None])
hf_q, hf_k = apply_rotary_pos_emb(q, k, cos9, sin9)
ours_q, ours_k = apply_rope(q, cos9, sin9), apply_rope(k, cos9, sin9)
assert torch.equal(ours_q, hf_q) and torch.equal(ours_k, hf_k)
torch.testing.assert_close(
    ours_q.norm(dim=-1), q.norm(dim=-1)
)  # a rotation keeps lengths
print("apply_rope == HF apply_rotary_pos_emb, bit for bit; norms kept")

# %% [markdown]
# The point of rotating: the score between a query at position `m` and a key at position `n` depends on `m - n`
# only. Below, one query/key pair placed at every combination of 64 positions; each diagonal is constant.

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

fig, ax = plt.subplots(figsize=(4, 3.5))
ax.imshow(scores, cmap="RdBu")
ax.set(
    xlabel="key position",
    ylabel="query position",
    title="q.k after RoPE: constant along diagonals",
)
plt.show()

# %% [markdown]
# ## Rotate half vs interleaved
#
# The RoPE paper pairs *neighbouring* channels `(0, 1), (2, 3), ...`; transformers' Llama/Qwen code pairs
# channel `i` with `i + 32`. These are the same rotation applied to a different ordering of the channels. Here
# is the interleaved form, written inline for comparison only (minqwen uses rotate half):


# %%
def apply_rope_interleaved(x, angles):
    """Rotate channels (2i, 2i+1) by angles[..., i]: the RoPE paper's layout."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos_, sin_ = angles.cos(), angles.sin()
    return torch.stack(
        [even * cos_ - odd * sin_, even * sin_ + odd * cos_], dim=-1
    ).flatten(-2)


# interleaved channel order -> rotate-half order: evens first, then odds
to_half = torch.cat(
    [torch.arange(0, config.head_dim, 2), torch.arange(1, config.head_dim, 2)]
)
print(
    "rotate-half channel j holds interleaved channel",
    to_half[:4].tolist(),
    "...",
    to_half[pairs : pairs + 4].tolist(),
    "...",
)

positions9 = torch.arange(100, 109)
angles9 = positions9[:, None].float() * inv_freq
q1, k1 = torch.randn(9, config.head_dim), torch.randn(9, config.head_dim)
interleaved_scores = (
    apply_rope_interleaved(q1, angles9) @ apply_rope_interleaved(k1, angles9).T
)
cos_h, sin_h = rope_cos_sin(inv_freq, positions9[None])
half_q = apply_rope(q1[None, None, :, to_half], cos_h, sin_h)[0, 0]
half_k = apply_rope(k1[None, None, :, to_half], cos_h, sin_h)[0, 0]
half_scores = half_q @ half_k.T
diff_table({"interleaved vs permuted rotate-half": (half_scores, interleaved_scores)})

# %% [markdown]
# The attention scores agree to float32 rounding (the sums run in a different order). That is why a checkpoint
# trained with one layout runs under the other once the rows of `q_proj` and `k_proj` (and their biases) are
# permuted, which is what conversion scripts from Meta's original Llama weights do. Qwen2's checkpoints are
# already in the rotate-half order, so minqwen loads them as they are.

# %%
assert (
    half_scores - interleaved_scores
).abs().max() < 1e-5 * interleaved_scores.abs().max()
# Without the permutation the two layouts give different scores.
unpermuted = (
    apply_rope(q1[None, None], cos_h, sin_h)[0, 0]
    @ apply_rope(k1[None, None], cos_h, sin_h)[0, 0].T
)
assert not torch.allclose(unpermuted, interleaved_scores, atol=1e-3)

# %% [markdown]
# ## YaRN: stretching the context
#
# Qwen2.5's model cards extend the context to 128k by adding
# `"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`. YaRN divides the
# *slow* pairs' frequencies by the factor (so positions up to 4 x 32k map onto angles seen in training), keeps
# the *fast* pairs as they are (they already turn many times within the trained context, and slowing them would
# blur nearby positions), and blends linearly in between. The blend's bounds are the pairs that complete
# `beta_fast = 32` and `beta_slow = 1` turns within the original context. It also scales cos and sin by
# `0.1 ln(factor) + 1`, which sharpens the softmax that longer contexts flatten.

# %%
show_source(yarn_inv_freq)

# %% [markdown]
# Now the same config, Qwen2.5-0.5B's shape with the model-card scaling, read by transformers and by minqwen.
# Note that `max_position_embeddings` stays 32,768 in Qwen's released configs: the factor, not that field, sets
# the stretch.

# %%
# the layout of Qwen's released config.json files: rope_theta at the top, the card's rope_scaling beside it
yarn_json = json.loads(model_path().joinpath("config.json").read_text())
yarn_json.pop(
    "rope_parameters", None
)  # how transformers 5 writes it; released files keep the older layout
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
    hf_yarn_config = Qwen2Config(
        **copy.deepcopy(yarn_json)
    )  # transformers edits the dicts it is given
    hf_yarn, hf_yarn_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_yarn_config)
yarn_config = ModelConfig.from_dict(yarn_json)
yarn, yarn_scale = rope_inv_freq(yarn_config)
print(yarn_config.rope_scaling)
print(f"attention factor: minqwen {yarn_scale!r}, HF {hf_yarn_scale!r}")
diff_table({"YaRN inv_freq, ours vs HF": (yarn, hf_yarn)})

# %%
assert torch.equal(yarn, hf_yarn)
assert (
    yarn_config.rope_theta
    == hf_yarn_config.rope_parameters["rope_theta"]
    == 1_000_000.0
)
assert yarn_scale == hf_yarn_scale == 0.1 * math.log(4.0) + 1.0
yarn_rotary = Qwen2RotaryEmbedding(hf_yarn_config)
far = torch.arange(0, 4 * 32768, 512)[None]
assert all(
    torch.equal(a, b)
    for a, b in zip(
        rope_cos_sin(yarn, far, yarn_scale), yarn_rotary(torch.zeros(1), far)
    )
)

ratio = yarn / inv_freq
fig, ax = plt.subplots()
ax.plot(ratio, marker=".")
ax.set(
    xlabel="pair i",
    ylabel="YaRN inv_freq / plain inv_freq",
    title="YaRN keeps fast pairs, slows slow ones by 4x",
)
plt.show()

# %% [markdown]
# The pairs below the ramp keep their frequency exactly, those above it are slowed by exactly 4:

# %%
kept, slowed = (
    (ratio == 1).sum().item(),
    torch.isclose(ratio, torch.tensor(0.25)).sum().item(),
)
print(f"{kept} pairs kept, {slowed} slowed by 4, {pairs - kept - slowed} blended")
assert kept > 0 and slowed > 0

# %% [markdown]
# Finally the whole model with YaRN: a tiny random Qwen2 with the scaling on, run by transformers and by
# minqwen over 200 positions, well past its "original" 64.

# %%
import tempfile

from transformers import Qwen2ForCausalLM

import minqwen

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
tiny_diff

# %%
assert tiny_ours.rope_scale == yarn_rotary.attention_scaling
assert float(tiny_diff.loc["YaRN tiny model logits", "max_rel"]) <= 1e-5
