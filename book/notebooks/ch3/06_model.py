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
# # The whole model
#
# The pieces of the last four pages, assembled: the embedding, a stack of decoder layers (RMSNorm, attention with
# RoPE, a residual add, RMSNorm, SwiGLU, a residual add), a final RMSNorm and the LM head. `minqwen.Qwen2` is the
# whole forward pass, with no transformers code in it, and a loader that maps the checkpoint's tensor names
# explicitly. Does it compute HF's logits, module by module, does it generate HF's text, and what does running
# it in bf16 cost?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how `minqwen.Qwen2` assembles the decoder layers around the {term}`residual stream`, and how it loads a
#   checkpoint;
# - that its {term}`logits` equal HF's, alone, in a left-padded batch and module by module;
# - that greedy generation reproduces the {term}`golden reference` token for token;
# - how much {term}`bf16` moves the logits, layer by layer, against the budget the book sets.
#
# **You need** the components from {doc}`02_rope`, {doc}`03_gqa`, {doc}`04_swiglu` and {doc}`05_rmsnorm`, and
# the layer probe from {doc}`../ch2/03_layer_probe`. Running it loads the embedded model four times, in float32
# and in bf16 (about a minute on a laptop CPU).
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import model as figures
from helpers import (
    DEVICE,
    DTYPE,
    diff_stats,
    golden_applies,
    load_golden,
    model_path,
    show_source,
    tokenizer,
    tolerance,
)

import ast
import gc
import inspect

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

import minqwen
from minqwen.model import config, layers, qwen2, rope
from minqwen.model.layers import DecoderLayer
from minqwen.model.qwen2 import positions_from_mask
from minqwen.tools.probe import compare_layers, format_table, rows_as_dicts

_ = torch.manual_seed(0)

# %% [markdown]
# ## The forward pass
#
# Token ids become vectors $h_0 = E[\text{ids}]$. Each decoder layer $\ell$ reads the residual stream, normalises
# it, and adds what attention and then the MLP compute from it:
#
# $$
# h' = h_{\ell-1} + \operatorname{Attn}\big(\operatorname{RMSNorm}(h_{\ell-1})\big),
# \qquad
# h_\ell = h' + \operatorname{MLP}\big(\operatorname{RMSNorm}(h')\big).
# $$
#
# After the last layer $L$, a final norm and the LM head give one score per vocabulary token,
# $\text{logits} = W_\text{head}\,\operatorname{RMSNorm}(h_L)$. `DecoderLayer.forward` is the two equations;
# `Qwen2.forward` computes the positions, cos/sin and the mask once, runs the layers, and applies the head.

# %%
show_source(DecoderLayer.forward)
show_source(minqwen.Qwen2)

# %% [markdown]
# The forward path is these four modules (plus a KV cache object, when one is passed), and none of them imports
# transformers:

# %% tags=["hide-input"]
forward_modules = (qwen2, layers, rope, config)


def imported_packages(module) -> set[str]:
    """Top-level packages a module imports, other than minqwen itself."""
    tree = ast.parse(inspect.getsource(module))
    found = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    found |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    return found - {"__future__", "minqwen"}


imports = {m.__name__: sorted(imported_packages(m)) for m in forward_modules}
lines = sum(len(inspect.getsource(m).splitlines()) for m in forward_modules)
print(f"{lines} lines in all")
for name, names in imports.items():
    print(f"{name:16s} imports {', '.join(names)}")
assert not any("transformers" in names for names in imports.values())

# %% [markdown]
# ## Loading
#
# `from_pretrained` reads and validates `config.json`, builds the model on the `meta` device (no memory), reads
# every tensor of the safetensors files under minqwen's name, and checks the set of names and every shape against
# what the config implies before assigning anything. The name map is one rule, HF's `model.` prefix goes:

# %%
show_source(minqwen.model.qwen2.hf_to_minqwen)

# %%
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)
hf = AutoModelForCausalLM.from_pretrained(model_path(), dtype=DTYPE).to(DEVICE).eval()
ours_names = set(ours.state_dict())
hf_names = {minqwen.model.qwen2.hf_to_minqwen(n) for n in hf.state_dict()}
parameters = sum(p.numel() for p in ours.parameters())
print(
    f"{len(ours_names)} tensors, {parameters / 1e6:.1f}M parameters, "
    f"tied head: {ours.config.tie_word_embeddings}; "
    f"same names as HF's: {ours_names == hf_names}"
)
assert ours_names == hf_names

# %% [markdown]
# ## Logits against HF
#
# A prompt through both models; `ours(input_ids)` returns logits of shape `[batch, seq, vocab]`.

# %%
prompt = "def is_palindrome(s: str) -> bool:\n    "
ids = tokenizer()(prompt, return_tensors="pt").input_ids.to(DEVICE)
with torch.no_grad():
    logits = ours(ids)
    hf_logits = hf(ids).logits
stats = diff_stats(logits, hf_logits)
print(f"logits {tuple(logits.shape)}, max |logit| {hf_logits.abs().max():.1f}")
print(f"max |Δlogit| {stats['max_abs']:.2e}, relative {stats['max_rel']:.2e}")
assert logits.shape == (1, ids.shape[1], ours.config.vocab_size)
assert stats["max_rel"] <= tolerance("forward")
assert torch.equal(logits.argmax(-1), hf_logits.argmax(-1))

# %% [markdown]
# And a batch of two prompts, the shorter one left-padded ({term}`left padding`). Padding must not move a
# prompt's positions, so positions count real tokens only (`positions_from_mask`); HF's forward is given the
# same positions, as its `generate` computes them. Only real tokens are compared.

# %%
show_source(positions_from_mask)

# %% tags=["hide-input"]
batch = tokenizer()(
    ["x = 1", "for i in range(10):\n    print(i)"],
    return_tensors="pt",
    padding=True,
    padding_side="left",
)
batch_ids, mask = batch.input_ids.to(DEVICE), batch.attention_mask.to(DEVICE)
with torch.no_grad():
    batch_logits = ours(batch_ids, attention_mask=mask)
    hf_batch = hf(
        batch_ids, attention_mask=mask, position_ids=positions_from_mask(mask)
    ).logits
    alone = ours(batch_ids[:1, mask[0].bool()])
real = mask.bool()
batch_stats = diff_stats(batch_logits[real], hf_batch[real])
alone_stats = diff_stats(batch_logits[0, mask[0].bool()], alone[0])
print(f"padded batch against HF: relative {batch_stats['max_rel']:.2e}")
print(f"short prompt padded against alone: relative {alone_stats['max_rel']:.2e}")
assert batch_stats["max_rel"] <= tolerance("forward")
assert alone_stats["max_rel"] <= tolerance("forward")

# %% [markdown]
# The padded prompt and the same prompt alone differ by rounding only: the padded batch runs matrices of another
# shape, which sum in another order.
#
# ## Module by module
#
# `minqwen.tools.probe.compare_layers` hooks the embedding, each decoder layer, the final norm and the head in both
# models and diffs their outputs. Were a component wrong, the first row off would say where.

# %%
rows = compare_layers(hf, ours, ids)
per_layer = pd.DataFrame(rows_as_dicts(rows))
identical = int((per_layer["max_abs"] == 0).sum())
print(
    f"{identical}/{len(rows)} modules bit-identical to HF's, "
    f"max |Δ| {per_layer['max_abs'].max():.3g}, "
    f"max relative {per_layer['max_rel'].max():.3g}"
)
assert (per_layer["max_rel"] <= tolerance("forward")).all()
if DEVICE == "cpu" and DTYPE == torch.float32:
    assert identical == len(rows)

# %% tags=["remove-input", "hide-output"]
print(format_table(rows))

# %% [markdown]
# On a CPU in float32 every module's output is HF's, bit for bit: the same operations in the same order, from
# the embedding to the logits. The table of all modules is folded above.
#
# ## Greedy generation
#
# `minqwen.generate` ({doc}`../ch4/02_manual_cache` takes it apart) with {term}`greedy decoding` must reproduce,
# token for token, the golden references that `pipeline()` recorded in {doc}`../ch1/01_pipeline` (greedy, with
# the checkpoint's own repetition penalty, up to 48 new tokens). With a model other than the embedded one, or in bf16, the references
# do not apply, and HF's `generate` with the same settings is the reference instead.

# %% tags=["hide-input"]
if golden_applies():
    references = [
        (r["name"], r["prompt_ids"], r["output_ids"], r["max_new_tokens"])
        for r in load_golden()
    ]
    assert all(not r["do_sample"] for r in load_golden())
else:
    request = "Write a Python function that reverses a string."
    chat = tokenizer().apply_chat_template(
        [{"role": "user", "content": request}], add_generation_prompt=True
    )["input_ids"]
    with torch.no_grad():
        hf_ids = hf.generate(
            torch.tensor([chat], device=DEVICE),
            attention_mask=torch.ones(1, len(chat), dtype=torch.long, device=DEVICE),
            do_sample=False,
            max_new_tokens=24,
        )
    references = [("HF generate", chat, hf_ids[0].tolist(), 24)]

# %%
for name, prompt_ids, expected, max_new_tokens in references:
    generated = minqwen.generate(
        ours,
        torch.tensor([prompt_ids], device=DEVICE),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    new = generated[0, len(prompt_ids) :].tolist()
    same = generated[0].tolist() == expected
    print(f"--- {name}: {len(new)} new tokens, identical: {same}")
    print(tokenizer().decode(new, skip_special_tokens=True))
    assert same, name

# %% [markdown]
# ## bf16: the error, and its budget
#
# Served models run in bf16, which keeps 8 significant bits: each rounding costs up to
# $2^{-8} \approx 3.9 \times 10^{-3}$ of a value, and the roundings of every layer accumulate. HF and minqwen are
# loaded again in bf16 and compared with the float32 logits above. What matters in practice is whether the next
# token changes, so the table also counts how often the top-1 token agrees with float32.
#
# **Budget.** Against float32, bf16 may move the logits by up to 5% of their largest magnitude,
# $\max|\Delta\text{logit}| / \max|\text{logit}| \le 5 \times 10^{-2}$, and must keep the argmax on at least 90%
# of the positions of this prompt. minqwen in bf16 must be as close to float32 as HF in bf16 is, within a factor
# of 2. The budget is stated against float32 rather than as equality with HF because on a GPU different attention
# kernels may round differently.

# %% tags=["hide-input"]
reference = (logits.float(), hf_logits.float())
del ours
gc.collect()
ours16 = minqwen.Qwen2.from_pretrained(
    model_path(), dtype=torch.bfloat16, device=DEVICE
)
# module by module against float32, while HF's float32 model is still loaded
rows16 = rows_as_dicts(compare_layers(hf, ours16, ids))
del hf
gc.collect()
hf16 = (
    AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.bfloat16)
    .to(DEVICE)
    .eval()
)
with torch.no_grad():
    ours16_logits, hf16_logits = ours16(ids).float(), hf16(ids).logits.float()
fp32_reference = reference[1]


def top1(a, b=fp32_reference):
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


bf16_table = pd.DataFrame(
    {
        "HF bf16 vs fp32": {
            **diff_stats(hf16_logits, fp32_reference),
            "top-1 agreement": top1(hf16_logits),
        },
        "minqwen bf16 vs fp32": {
            **diff_stats(ours16_logits, fp32_reference),
            "top-1 agreement": top1(ours16_logits),
        },
        "minqwen bf16 vs HF bf16": {
            **diff_stats(ours16_logits, hf16_logits),
            "top-1 agreement": top1(ours16_logits, hf16_logits),
        },
    }
).T
bf16_table.map(lambda v: f"{v:.2e}" if v < 0.5 else f"{v:.2f}")

# %%
hf_error = bf16_table.loc["HF bf16 vs fp32", "max_rel"]
ours_error = bf16_table.loc["minqwen bf16 vs fp32", "max_rel"]
print(
    f"minqwen bf16: {ours_error:.1e} of the largest logit, "
    f"{ours_error / 5e-2:.0%} of the budget"
)
assert hf_error <= 5e-2 and ours_error <= 5e-2
assert ours_error <= 2 * hf_error
assert bf16_table["top-1 agreement"].min() >= 0.9

# %% [markdown]
# Module by module, minqwen's bf16 model against HF's float32 one. The embedding is one bf16 rounding off; the
# first layer already brings it to about a percent. After that it stays about that size through the stack,
# instead of compounding layer after layer, and rises in the last layers. The largest error of any module is
# printed below the figure; the logits stay inside the budget.

# %% tags=["hide-input"]
errors16 = pd.Series(
    [row["max_rel"] for row in rows16],
    index=["embed", *(str(i) for i in range(len(rows16) - 3)), "norm", "head"],
    name="minqwen bf16 against HF float32",
)
figures.error_through_the_layers(errors16, 5e-2)
print(
    f"largest: {errors16.max():.1e} after module {errors16.idxmax()!r}; "
    f"logits: {errors16['head']:.1e}"
)
assert (errors16 <= 5e-2).all()
# the exercises use the model at the working precision again
del ours16, hf16
gc.collect()
ours = minqwen.Qwen2.from_pretrained(model_path(), dtype=DTYPE, device=DEVICE)

# %% [markdown]
# ## Summary
#
# - A decoder layer is two residual adds, $h + \operatorname{Attn}(\operatorname{RMSNorm}(h))$ then
#   $h + \operatorname{MLP}(\operatorname{RMSNorm}(h))$; the model is an embedding, a stack of them, a final norm
#   and the LM head.
# - minqwen's forward pass is four small modules with no transformers import; the loader maps names by one rule
#   and checks every name and shape before assigning.
# - On a CPU in float32 minqwen's logits are HF's, bit for bit, module by module, and a left-padded batch gives
#   each prompt its logits alone, up to rounding.
# - Greedy generation reproduces the golden references token for token.
# - In bf16 every module is off by a percent or so, not more with each layer, and the logits stay well inside
#   the budget of 5% of the largest logit, with the top token of float32.
#
# ## Exercises
#
# ````{exercise}
# :label: model-logit-lens
# The "logit lens": apply the final norm and the LM head to the residual stream after every layer, as if the
# model stopped there. From which layer on is the top token at the prompt's last position the one the full model
# predicts?
# ````
#
# ```{solution-start} model-logit-lens
# :class: dropdown
# ```

# %%
stream = []
handles = [
    layer.register_forward_hook(lambda m, args, out: stream.append(out[0, -1]))
    for layer in ours.layers
]
with torch.no_grad():
    final = ours(ids)[0, -1].argmax().item()
    lens = [ours.lm_head(ours.norm(h)).argmax().item() for h in stream]
for handle in handles:
    handle.remove()
agree = [i for i, token in enumerate(lens) if token == final]
settled = next(i for i in range(len(lens)) if all(t == final for t in lens[i:]))
print(f"final prediction: {tokenizer().decode([final])!r}")
print("top token after each layer:")
cells = [f"{i:2d} {tokenizer().decode([t])!r:9}" for i, t in enumerate(lens)]
for start in range(0, len(cells), 6):
    print("  ".join(cells[start : start + 6]))
print(f"the prediction is settled from layer {settled} on")
assert lens[-1] == final

# %% [markdown]
# The last layer's lens is the model's own output, by construction. The early layers' lenses give tokens with no
# bearing on the prompt, and the final choice settles only in the last layers (the layer printed above): most of
# the stack builds a representation that the head cannot read directly yet.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: model-mask
# Run the left-padded batch again without its attention mask, and measure how far the short prompt's logits move
# from its logits alone. Then give the mask back, but let positions count the padding too (`torch.arange` over the
# whole row). Which of the two matters, and why?
# ````
#
# ```{solution-start} model-mask
# :class: dropdown
# ```

# %%
short = mask[0].bool()
counted = torch.arange(batch_ids.shape[1], device=DEVICE).expand_as(batch_ids)
with torch.no_grad():
    unmasked = ours(batch_ids)[0, short]
    shifted = ours(batch_ids, attention_mask=mask, position_ids=counted)[0, short]
moved = {
    "no mask": diff_stats(unmasked, alone[0])["max_rel"],
    "mask, positions counting padding": diff_stats(shifted, alone[0])["max_rel"],
}
print(f"{int((~short).sum())} padding tokens before the short prompt")
for case, error in moved.items():
    print(f"{case}: the short prompt's logits move by {error:.1e} of the largest")
assert moved["no mask"] > 0.01
assert moved["mask, positions counting padding"] <= 100 * tolerance("forward")

# %% [markdown]
# Without the mask, the short prompt's tokens attend to the padding tokens as if they were text, and its logits
# change completely. With the mask but shifted positions, they barely move: RoPE scores depend on the distances
# between tokens, and shifting every position of the prompt by the same amount keeps the distances. What is left
# is rounding, as cos and sin are taken at other angles. HF and minqwen still count real tokens only, so that
# each prompt gets exactly the numbers it gets alone.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: model-parameters
# Where are the model's parameters? Count them by component (embedding, attention, MLP, norms, LM head) and print
# each one's share. Mind a tied head, which shares its matrix with the embedding.
# ````
#
# ```{solution-start} model-parameters
# :class: dropdown
# ```


# %%
def component(name):
    for prefix, part in (
        ("embed_tokens", "embedding"),
        ("lm_head", "LM head"),
        (".self_attn.", "attention"),
        (".mlp.", "MLP"),
    ):
        if prefix in name:
            return part
    return "norms"


count = dict.fromkeys(["embedding", "attention", "MLP", "norms", "LM head"], 0)
for name, p in ours.named_parameters():  # a tied head is listed once, as the embedding
    count[component(name)] += p.numel()
total = sum(count.values())
for part, n in count.items():
    print(f"{part:10s} {n / 1e6:8.2f}M  {n / total:6.1%}")
assert total == sum(p.numel() for p in ours.parameters())

# %% [markdown]
# In a model this small the vocabulary weighs heavily: the embedding, and an untied head, hold one row of 896 for
# each of 151,936 tokens, a large share beside all the layers (the shares above). The larger Qwen2.5 sizes have
# the same vocabulary and much wider layers, so there the MLPs take over.
#
# ```{solution-end}
# ```
