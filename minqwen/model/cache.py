"""KV caches: the keys and values of every past token, so each new token costs one position, not the whole prefix.

Both caches keep per-layer tensors shaped [batch, kv_heads, seq, head_dim], like transformers' own cache, and
share one interface: `update(layer, k, v)` stores the new positions and returns everything stored so far for
that layer; `length` counts the positions already stored, and the model advances it after the last layer;
`crop(length)` forgets every position from `length` on, as speculative decoding does with rejected drafts.
"""

from __future__ import annotations

import torch


class DynamicKVCache:
    """Grows by concatenation: simple, but every step reallocates each layer's tensors."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    @property
    def capacity(self) -> float:
        return float("inf")

    def crop(self, length: int) -> None:
        check_crop(length, self.length)
        self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None else v[:, :, :length] for v in self.values]
        self.length = length


class StaticKVCache:
    """Preallocated for `max_len` positions: writes go into place, nothing is reallocated while decoding."""

    def __init__(
        self, num_layers, batch, kv_heads, max_len, head_dim, dtype=torch.float32, device="cpu"
    ):
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> StaticKVCache:
        c, weight = model.config, model.embed_tokens.weight
        return cls(
            c.num_hidden_layers,
            batch,
            model.layers[0].self_attn.kv_heads,  # a tensor-parallel rank's share of them
            max_len,
            c.head_dim,
            weight.dtype,
            weight.device,
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def crop(self, length: int) -> None:
        """The positions past `length` stay in memory and are overwritten by the next update."""
        check_crop(length, self.length)
        self.length = length

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.capacity} positions; writing up to {end} overflows it"
            )
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def check_crop(length: int, stored: int) -> None:
    """A cache of `stored` positions can keep its first 0 to `stored` of them."""
    if not 0 <= length <= stored:
        raise ValueError(f"cannot crop a cache of {stored} positions to {length}")
