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
# # Splitting a model across processes
#
# Qwen2.5-72B holds 145 GB of bf16 weights; one H200 holds 141 GB. And even where a model fits, decoding one
# token reads every weight once, so one GPU's memory bandwidth sets the pace. *Tensor parallelism* splits every
# weight matrix across $N$ devices: each reads $1/N$ of the weights per token, and the devices exchange a few
# small vectors per layer. This page splits the model the way Megatron-LM does, checks each split by hand on
# the embedded model, and then runs it as two real processes, launched by `torchrun`.
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - why splitting a matrix by output rows needs no communication, and by input columns needs one sum;
# - how Qwen2's attention splits by heads (each kv head travels with its query heads), the MLP by channels,
#   and the embedding and LM head by vocabulary, for two all-reduces per layer;
# - how each process reads only its own slices from the safetensors files;
# - how `torchrun` and `torch.distributed` run the same program as $N$ cooperating processes, on CPUs here.
#
# **You need** the layer of {doc}`../ch3/06_model` and grouped-query attention from {doc}`../ch3/03_gqa`. It runs
# on the CPU with the embedded model, in about a minute.
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import parallel as figures
from helpers import model_path, show_source, stamp

import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import minqwen
from minqwen.model.layers import attend
from minqwen.model.rope import apply_rope, rope_cos_sin
from minqwen.model.sizes import SIZES, as_config
from minqwen.parallel import collectives, sharding
from minqwen.parallel.collectives import TensorParallel
from minqwen.parallel.sharding import SPLIT_DIM, check_split, rank_slice

model = minqwen.Qwen2.from_pretrained(model_path())
config = model.config
torch.manual_seed(0)
print(stamp())

# %% [markdown]
# ## Two ways to split a matrix product
#
# A linear layer computes $Y = XW^\top$, with $W$ of shape [out, in]. Split $W$ between two ranks by **output
# rows** and each rank computes its own columns of $Y$, whole, from the whole input:
#
# $$
# W = \begin{bmatrix} W_0 \\ W_1 \end{bmatrix} \quad\Rightarrow\quad
# Y = \begin{bmatrix} X W_0^\top & X W_1^\top \end{bmatrix}.
# $$
#
# Split it by **input columns** instead and each rank needs only its part of the input, but produces a partial
# sum of all of $Y$; one *all-reduce* (every rank sends its partial sum and receives the total) completes it:
#
# $$
# W = \begin{bmatrix} W_0 & W_1 \end{bmatrix},\quad X = \begin{bmatrix} X_0 & X_1 \end{bmatrix}
# \quad\Rightarrow\quad Y = X_0 W_0^\top + X_1 W_1^\top.
# $$
#
# The trick of Megatron-LM (Shoeybi et al., 2019) is to pair them: a row-split layer's output columns are
# exactly the input columns the next, column-split layer needs, with only elementwise work between them. So a
# pair costs one all-reduce. minqwen names the split of each weight by its module:

# %%
SPLIT_DIM

# %% [markdown]
# Dimension 0 splits output rows, 1 input columns. `rank_slice` turns that into the index a rank keeps; norms,
# which are small and needed whole, are not split:

# %%
show_source(rank_slice)

# %% tags=["hide-input"]
one_layer = {
    name.split(".")[-2]: tuple(p.shape)
    for name, p in model.named_parameters()
    if name.startswith("layers.0.") and name.endswith("proj.weight")
}
figures.split_map(
    one_layer | {"embed_tokens": (config.vocab_size, config.hidden_size)}, SPLIT_DIM, 2
)

# %% [markdown]
# ## The MLP: one all-reduce
#
# SwiGLU is $\text{down}(\text{silu}(\text{gate}\,x) \odot \text{up}\,x)$. Gate and up are split by rows, so
# rank $r$ computes its own share of the 4,864 channels, whole; the product $\odot$ is per channel, so it stays
# on the rank; down is split by columns, the same channels, and gives a partial sum:
#
# $$
# \text{MLP}(x) = \sum_{r} \text{down}_r\!\left(\text{silu}(\text{gate}_r\,x) \odot \text{up}_r\,x\right).
# $$
#
# Here is that sum, done by hand for two ranks on layer 3 of the embedded model:

# %%
layer = model.layers[3]
x = torch.randn(1, 5, config.hidden_size)


def weight_of_rank(module, name, rank, world=2):
    weight = module.weight
    return weight[
        rank_slice(
            f"{name}.weight", tuple(weight.shape), TensorParallel(rank, world, "")
        )
    ]


def mlp_partial(rank):
    gate = weight_of_rank(layer.mlp.gate_proj, "gate_proj", rank)
    up = weight_of_rank(layer.mlp.up_proj, "up_proj", rank)
    down = weight_of_rank(layer.mlp.down_proj, "down_proj", rank)
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


with torch.no_grad():
    by_hand = mlp_partial(0) + mlp_partial(1)  # the all-reduce
    whole = layer.mlp(x)
torch.testing.assert_close(by_hand, whole, rtol=1e-5, atol=1e-5)
gap = (by_hand - whole).abs().max()
print(f"sum of the two ranks' partial MLPs = the whole MLP (max diff {gap:.1e})")

# %% [markdown]
# The difference is rounding: each rank sums over half of the channels, and the all-reduce adds the two halves,
# a different order from one long sum.
#
# ## Attention: split by heads, one all-reduce
#
# Attention is already split: each head attends on its own. Giving rank $r$ a contiguous block of query heads
# and the same block of key/value heads keeps each group together, since query head $h$ reads kv head
# $\lfloor h / g \rfloor$ with $g$ = heads per kv head: the embedded model's 14 query heads and 2 kv heads become 7
# and 1 on each of two ranks. q, k and v are split by rows (whole heads), the rank caches only its own keys and
# values, and o_proj is split by the columns of those heads:
#
# $$
# \text{Attn}(x) = \sum_{r} O_r \,\text{concat}_{h \in \text{heads}(r)} \text{softmax}\!\left(\frac{q_h k_h^\top}{\sqrt{d}}\right) v_h .
# $$

# %%
positions = torch.arange(5)[None]
cos, sin = rope_cos_sin(model.inv_freq, positions, model.rope_scale, x.dtype)


def attention_partial(rank):
    attn, heads, kv_heads = (
        layer.self_attn,
        config.num_attention_heads // 2,
        config.num_key_value_heads // 2,
    )
    tp = TensorParallel(rank, 2, "")

    def project(module, name, count):
        weight = weight_of_rank(module, name, rank)
        bias = module.bias[rank_slice(f"{name}.bias", tuple(module.bias.shape), tp)]
        return (x @ weight.T + bias).view(1, 5, count, config.head_dim).transpose(1, 2)

    q, k = (
        project(attn.q_proj, "q_proj", heads),
        project(attn.k_proj, "k_proj", kv_heads),
    )
    v = project(attn.v_proj, "v_proj", kv_heads)
    out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, None)
    return (
        out.transpose(1, 2).reshape(1, 5, -1)
        @ weight_of_rank(attn.o_proj, "o_proj", rank).T
    )


with torch.no_grad():
    by_hand = attention_partial(0) + attention_partial(1)  # the all-reduce
    whole = layer.self_attn(x, cos, sin, None)
torch.testing.assert_close(by_hand, whole, rtol=1e-5, atol=1e-5)
print("sum of the two ranks' partial attentions = the whole attention")

# %% [markdown]
# So a layer is two all-reduces, and everything else happens on one rank with no communication: the norms, RoPE,
# the KV cache, attention, SwiGLU and the residual adds. Every rank starts each half with the whole hidden
# vector, because the all-reduce gives every rank the total.

# %% tags=["hide-input"]
figures.layer_flow(2)

# %% [markdown]
# In code, the only new module is the row-split linear layer: an `nn.Linear` over its columns, then the sum.

# %%
show_source(sharding.RowParallelLinear)
show_source(collectives.all_reduce)

# %% [markdown]
# `all_reduce` is a *functional* collective: it returns a new tensor rather than summing in place, so
# `torch.compile` can trace it like any other operation, and the fast engine's compiled decode layer and its
# CUDA graph carry the all-reduces inside ({doc}`02_two_gpus`).
#
# ## The embedding and the LM head: split by vocabulary
#
# The embedding table (151,936 rows) and the LM head are the largest matrices. Both are split by vocabulary
# rows. For the LM head that is a row split, and each rank's logits for its slice of the vocabulary are
# *gathered* side by side. For the embedding, a token's row lives on one rank only: every rank looks up the
# ids it holds and writes zeros for the rest, and an all-reduce (a sum with one non-zero term) gives every rank
# every row.

# %%
show_source(collectives.embed)

# %%
ids = torch.tensor([[9707, 11, 151643, 3, 100000]])
table = model.embed_tokens.weight
rows = config.vocab_size // 2
with torch.no_grad():
    looked_up = sum(
        F.embedding(
            (ids - r * rows).clamp(0, rows - 1), table[r * rows : (r + 1) * rows]
        )
        * ((ids >= r * rows) & (ids < (r + 1) * rows))[..., None]
        for r in range(2)
    )
assert torch.equal(looked_up, model.embed_tokens(ids))
print("the sum of the two ranks' masked lookups is the embedding, bit for bit")

# %% [markdown]
# The sum is exact: one term is the row, the other zero. The embedded model keeps a separate LM head (its GGUF
# file stores one); in a model that ties the head to the embedding, as the released 0.5B does, each rank's head
# slice is the very tensor of its embedding slice.
#
# ## Loading only a rank's share
#
# A rank must never hold the whole model, or a 72B could not be split across GPUs that each hold half of it.
# `Qwen2.from_pretrained(path, tensor_parallel=...)` builds the model on the `meta` device (shapes, no memory),
# splits its modules, and reads each split tensor as its slice: safetensors maps the file and hands back just
# the requested rows or columns. The split is checked against the config before anything is read. Loading
# needs no process group, so rank 1's share loads here, in this process:

# %%
share = minqwen.Qwen2.from_pretrained(
    model_path(), tensor_parallel=TensorParallel(1, 2, "unused")
)
held = sum(p.untyped_storage().nbytes() for p in share.parameters())
whole_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
attention = share.layers[0].self_attn
print(
    f"rank 1 holds {held / 2**30:.2f} GiB of the model's {whole_bytes / 2**30:.2f} GiB;"
)
print(f"its layers have {attention.heads} query heads and {attention.kv_heads} kv head")
assert abs(held / whole_bytes - 0.5) < 0.001
q = model.layers[0].self_attn.q_proj.weight
assert torch.equal(share.layers[0].self_attn.q_proj.weight, q[q.shape[0] // 2 :])

# %% [markdown]
# Half, less a sliver: the norms are held whole by every rank. A split that does not divide evenly is refused,
# with the sizes that would work:

# %%
try:
    check_split(config, 4)
except ValueError as error:
    print(textwrap.fill(str(error), 88))

# %% [markdown]
# ## Two real processes
#
# The split model needs one process per rank, each running the same program on the same input. PyTorch's
# launcher, `torchrun`, starts them and tells each its place (`RANK`, `WORLD_SIZE`, where to meet), and
# `torch.distributed` connects them: through NCCL between GPUs, through gloo between CPU processes, as here.
# `minqwen.parallel.launch.join` is the whole setup:

# %%
show_source(minqwen.parallel.launch.join)

# %% [markdown]
# The command line takes `--tp N` under `torchrun --nproc-per-node N`. Every rank runs the model; rank 0 alone
# reads the prompt and prints. Two CPU processes, each holding half of the embedded model, answer exactly as one
# process does:

# %%
command = ["-m", "minqwen", "generate", "Name three prime numbers.", "--greedy"]
command += ["--max-new-tokens", "24"]
launcher = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node=2",
]
split_run = subprocess.run(
    [*launcher, *command, "--tp", "2"], capture_output=True, text=True
)
one_run = subprocess.run([sys.executable, *command], capture_output=True, text=True)
assert split_run.returncode == 0, split_run.stderr[-2000:]
assert split_run.stdout == one_run.stdout
print(split_run.stdout)

# %% [markdown]
# In float32 the two runs choose the same tokens: their logits differ only by rounding, as in the checks above.
# `tests/test_ch8_parallel.py` holds the same equality for greedy and seeded sampling, through the eager loop and
# the fast engine, on a left-padded batch. Sampling needs a seed that every rank shares, or each rank would draw
# its own token and their caches would part; an unseeded sampling request on a split model is refused, and the
# command line has rank 0 choose a seed for all.
#
# ## Summary
#
# - A row split needs no communication and a column split one sum; pairing them costs one all-reduce per pair,
#   so a Qwen2 layer costs two: after o_proj and after down_proj.
# - Attention splits by heads, each kv head with its query heads, and each rank caches only its own heads'
#   keys and values. The MLP splits by channels. The embedding and head split by vocabulary.
# - Each rank reads only its slices from the safetensors files, into a model built on the `meta` device, so a
#   model larger than any one device loads.
# - `torchrun` starts the processes and `torch.distributed` joins them; the same code runs on gloo (CPUs) and
#   NCCL (GPUs), and in float32 its tokens are a single process's.
#
# ## Exercises
#
# ````{exercise}
# :label: tp-sizes
# For which tensor-parallel sizes can each Qwen2.5 model be split? (Every count that is split must divide
# evenly.)
# ````
#
# ```{solution-start} tp-sizes
# :class: dropdown
# ```


# %%
def splits(size):
    fits = []
    for n in (1, 2, 4, 8, 16):
        try:
            check_split(as_config(size), n)
            fits.append(n)
        except ValueError:
            pass
    return fits


sizes = {size: splits(size) for size in SIZES}
sizes

# %% [markdown]
# The 0.5B to 3B have 2 kv heads, so at most 2 ranks; the 7B's 28 query heads stop it at 4; the 14B to 72B
# split 8 ways. Past the kv heads, engines such as vLLM *replicate* kv heads (each rank keeps a copy of the one
# its query heads need) instead of splitting them; minqwen refuses instead.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: tp-memory
# How many GiB of bf16 weights does each GPU hold for Qwen2.5-72B at tensor-parallel sizes 2, 4 and 8? Which
# of them fit on an 80 GB H100 with 10 GB left for the cache?
# ````
#
# ```{solution-start} tp-memory
# :class: dropdown
# ```

# %%
from minqwen.model.sizes import tensor_shapes  # noqa: E402

shapes = tensor_shapes("72B")
whole_72b = sum(torch.Size(s).numel() for s in shapes.values()) * 2
norms = sum(torch.Size(s).numel() for n, s in shapes.items() if "norm" in n) * 2
per_gpu = {n: ((whole_72b - norms) / n + norms) / 2**30 for n in (1, 2, 4, 8)}
print({n: f"{gib:.1f} GiB" for n, gib in per_gpu.items()})
h100, cache = 80e9 / 2**30, 10e9 / 2**30
fits = [n for n, gib in per_gpu.items() if gib + cache <= h100]
print(f"fits an 80 GB H100 with 10 GB to spare: TP = {fits}")
assert fits == [4, 8]

# %% [markdown]
# 72B needs 135 GiB whole, 68 GiB per GPU at TP=2, 34 at TP=4 and 17 at TP=8. An 80 GB card is 74.5 GiB, so
# TP=2 leaves under 7 GiB for the cache and activations: TP=4 is the first that fits. On 141 GB H200s, two
# suffice, as the next page shows.
#
# ```{solution-end}
# ```
