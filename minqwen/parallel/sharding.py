"""Which slice of each weight a rank holds, and the modules that hold them (Megatron-LM's split).

Each layer's two halves need one all-reduce each:

- attention: q, k and v are split by heads (column-parallel: each rank computes its heads whole), attention runs on
  the rank's own heads and caches only their keys and values, and o_proj is split by input columns
  (row-parallel: each rank's heads give a partial sum of the output, and one all-reduce adds them);
- MLP: gate and up are split by output rows, down by input columns, then one all-reduce.

The embedding and the LM head are split by vocabulary rows: a token's embedding comes from the rank holding its row
(an all-reduce of zeros and that row), and each rank's logits for its slice of the vocabulary are gathered. The
norms are small and every rank holds them whole.
"""

from __future__ import annotations

import torch
from torch import nn

from minqwen.model.config import ModelConfig
from minqwen.parallel.collectives import TensorParallel, all_reduce, embed, gather_last_dim

# The dimension of each weight (by the name of its module) that is split across ranks: 0 splits output rows, 1
# input columns. A bias is split with its weight's rows. Weights of modules not named here are held whole.
SPLIT_DIM = {
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "o_proj": 1,
    "gate_proj": 0,
    "up_proj": 0,
    "down_proj": 1,
    "embed_tokens": 0,
    "lm_head": 0,
}


class RowParallelLinear(nn.Linear):
    """A linear layer holding some of the input columns: its product is a partial sum, completed by an
    all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.tp)


class VocabParallelEmbedding(nn.Embedding):
    """The rows of the embedding table for one slice of the vocabulary."""

    def __init__(self, rows: int, dim: int, tp: TensorParallel, **kwargs):
        super().__init__(rows, dim, **kwargs)
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embed(ids, self.weight, self.tp)


class VocabParallelHead(nn.Linear):
    """The LM head's rows for one slice of the vocabulary; the logits of every slice are gathered."""

    def __init__(self, in_features: int, rows: int, tp: TensorParallel, **kwargs):
        super().__init__(in_features, rows, bias=False, **kwargs)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(super().forward(x), self.tp)


def check_split(config: ModelConfig, world_size: int) -> None:
    """A ValueError unless `world_size` ranks can split this model evenly; checked before anything loads."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"the tensor-parallel size must be a positive int, got {world_size!r}")
    counts = {
        "query heads": config.num_attention_heads,
        "key/value heads": config.num_key_value_heads,
        "MLP channels": config.intermediate_size,
        "vocabulary rows": config.vocab_size,
    }
    uneven = [f"{n:,} {what}" for what, n in counts.items() if n % world_size]
    if uneven:
        fits = [n for n in range(1, config.num_key_value_heads + 1) if _splits(counts, n)]
        raise ValueError(
            f"{world_size} ranks cannot split this model's {' and '.join(uneven)} evenly; use a "
            f"tensor-parallel size that divides every count: {', '.join(map(str, fits))}"
        )


def _splits(counts: dict, n: int) -> bool:
    return all(count % n == 0 for count in counts.values())


def rank_slice(name: str, shape: tuple[int, ...], tp: TensorParallel) -> tuple[slice, ...] | None:
    """The index of parameter `name` (full `shape`) that rank `tp.rank` holds, or None if it holds it whole."""
    module = name.split(".")[-2]
    if module not in SPLIT_DIM or (name.endswith(".bias") and SPLIT_DIM[module] == 1):
        return None
    dim = SPLIT_DIM[module]
    size = shape[dim] // tp.world_size
    index = [slice(None)] * len(shape)
    index[dim] = slice(tp.rank * size, (tp.rank + 1) * size)
    return tuple(index)


def shard(model, tp: TensorParallel):
    """Split a `Qwen2` in place for rank `tp.rank` of `tp.world_size` and return it.

    On a model built on the meta device (as `Qwen2.from_pretrained` builds one before reading its files) only
    the shapes change, so each rank then reads just its own slices. On a loaded model each rank keeps a copy of
    its slices and the full weights can be dropped. The split is checked first (`check_split`).
    """
    config = model.config
    check_split(config, tp.world_size)
    named = dict(model.named_modules())
    for name, module in list(named.items()):
        leaf = name.rpartition(".")[2]
        if leaf in SPLIT_DIM:
            parent = named[name.rpartition(".")[0]] if "." in name else model
            setattr(parent, leaf, _split_module(name, module, tp))
    for layer in model.layers:
        layer.self_attn.heads //= tp.world_size
        layer.self_attn.kv_heads //= tp.world_size
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.tensor_parallel = tp
    return model


def _split_module(name: str, module: nn.Module, tp: TensorParallel) -> nn.Module:
    """The module holding rank `tp.rank`'s slice of `module`, on the same device, with its values if it has any."""
    weight = module.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    rows, columns = weight.shape
    leaf = name.rpartition(".")[2]
    if leaf == "embed_tokens":
        split = VocabParallelEmbedding(rows // tp.world_size, columns, tp, **factory)
    elif leaf == "lm_head":
        split = VocabParallelHead(columns, rows // tp.world_size, tp, **factory)
    elif SPLIT_DIM[leaf] == 1:
        split = RowParallelLinear(columns // tp.world_size, rows, tp, **factory)
    else:
        has_bias = module.bias is not None
        split = nn.Linear(columns, rows // tp.world_size, bias=has_bias, **factory)
    if not weight.is_meta:
        with torch.no_grad():
            for param_name, param in split.named_parameters():
                full = getattr(module, param_name)
                index = rank_slice(f"{name}.{param_name}", tuple(full.shape), tp)
                param.copy_(full[index])
    return split
