"""The three collectives a tensor-parallel Qwen2 needs, as PyTorch's functional collectives.

Functional collectives return a new tensor instead of writing into their input, so `torch.compile` traces them
like any other operation: the fast engine's compiled decode layer carries its all-reduces inside, and the CUDA graph
of a decode step captures them. They are called through their `torch.ops._c10d_functional` operators, which are
the same in every PyTorch version this book runs on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_functional = torch.ops._c10d_functional


class TensorParallel(NamedTuple):
    """This process's place in a tensor-parallel job: `rank` of `world_size`, and the name of the process
    group they share (a plain string, so compiled code can take it as a constant)."""

    rank: int
    world_size: int
    group: str


def all_reduce(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """The sum of every rank's `x`, on every rank: what turns each rank's partial product into the whole."""
    if tp is None:
        return x
    return _functional.wait_tensor(_functional.all_reduce(x, "sum", tp.group))


def gather_last_dim(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Every rank's `x` side by side along the last dimension, in rank order: the logits of each rank's slice
    of the vocabulary become the logits of all of it."""
    if tp is None:
        return x
    stacked = _functional.all_gather_into_tensor(x.contiguous(), tp.world_size, tp.group)
    stacked = _functional.wait_tensor(stacked)
    return torch.cat(stacked.chunk(tp.world_size, dim=0), dim=-1)


def embed(ids: torch.Tensor, weight: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Embedding rows of `ids` from this rank's slice of the table: the rows it holds, zeros for the rest, then
    summed across ranks, so each id takes its row from the one rank that holds it."""
    if tp is None:
        return F.embedding(ids, weight)
    rows = weight.shape[0]
    local = ids - tp.rank * rows
    held = (local >= 0) & (local < rows)
    x = F.embedding(local.clamp(0, rows - 1), weight) * held[..., None].to(weight.dtype)
    return all_reduce(x, tp)
