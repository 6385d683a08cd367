"""GGUF's quantized block formats, dequantized from their bytes in plain PyTorch.

A quantized GGUF tensor is a sequence of fixed-size blocks. Each block stores a few values in few
bits plus the scale (and for some formats an offset) that maps them back to real numbers. The book's
model uses four formats:

- ``Q8_0``: 32 values in a block of 34 bytes: a float16 scale d, then 32 int8 values q; x = d q.
- ``Q5_0``: 32 values in 22 bytes: a float16 scale d, 4 bytes holding the fifth (high) bit of each
  value, and 16 bytes holding two low 4-bit halves each; x = d (q - 16).
- ``Q4_K``: 256 values in 144 bytes, a "super-block" of 8 sub-blocks of 32: float16 d and dmin,
  12 bytes packing a 6-bit scale s and a 6-bit minimum m for each sub-block, and 128 bytes of 4-bit
  values; x = (d s) q - (dmin m).
- ``Q6_K``: 256 values in 210 bytes, 16 sub-blocks of 16: 128 bytes of low 4 bits, 64 bytes of
  high 2 bits, 16 int8 sub-block scales s and a float16 d at the end; x = (d s) (q - 32).

Each function takes the blocks as uint8 rows, [blocks, bytes per block], and returns float32
[blocks, values per block], computed in the same order of float32 operations as ggml, so the
results are the reference's bit for bit.
"""

from __future__ import annotations

import torch

# format: (values per block, bytes per block)
BLOCK_FORMATS = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def float16_at(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 in bytes [start, start + 2) of every block, as float32 [blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def low_and_high_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[blocks, n] bytes to [blocks, 2n] 4-bit values: all low nibbles, then all high ones."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = float16_at(blocks, 0)
    q = blocks[:, 2:34].contiguous().view(torch.int8).float()
    return q * d


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = float16_at(blocks, 0)
    # Bytes 2-5 are one little-endian 32-bit word whose bit j is the fifth bit of value j.
    word = sum(blocks[:, 2 + i : 3 + i].long() << (8 * i) for i in range(4))
    high = (word >> torch.arange(32)) & 1
    q = low_and_high_nibbles(blocks[:, 6:22]).long() | (high << 4)
    return d * (q - 16).float()


def q4_k_scales_and_minimums(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_K block's 12 packed bytes to 8 six-bit scales and 8 six-bit minimums, int32 [blocks, 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 minimums 0-3 likewise. Scales and
    minimums 4-7 keep their low 4 bits in the two nibbles of bytes 8-11, and their top 2 bits in the
    spare top bits of bytes 0-7.
    """
    b = packed.int()
    first, second, last = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    scales = torch.cat([first & 63, (last & 0x0F) | ((first >> 6) << 4)], dim=1)
    minimums = torch.cat([second & 63, (last >> 4) | ((second >> 6) << 4)], dim=1)
    return scales, minimums


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = float16_at(blocks, 0), float16_at(blocks, 2)
    scales, minimums = q4_k_scales_and_minimums(blocks[:, 4:16])
    # 128 bytes in four runs of 32: run r holds sub-block 2r in its low nibbles and sub-block 2r + 1
    # in its high ones.
    runs = blocks[:, 16:144].reshape(-1, 4, 32)
    q = torch.stack([runs & 0x0F, runs >> 4], dim=2).reshape(-1, 8, 32).float()
    scale = (d * scales.float())[:, :, None]
    offset = (dmin * minimums.float())[:, :, None]
    return (scale * q - offset).reshape(-1, 256)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    low_bytes, high_bytes = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = float16_at(blocks, 208)
    # Each half of 128 values takes 64 low bytes and 32 high bytes. Value i of a half (0-127): its
    # low 4 bits are a nibble of low byte i % 64 (the low nibble for i < 64), its high 2 bits the
    # (i // 32)-th pair of bits of high byte i % 32.
    low = low_and_high_nibbles(low_bytes.reshape(-1, 64)).reshape(-1, 2, 128)
    pairs = (
        high_bytes.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    )
    high = (pairs & 3).reshape(-1, 2, 128)
    q = ((low | (high << 4)).int() - 32).reshape(-1, 16, 16).float()
    return ((d * scales)[:, :, None] * q).reshape(-1, 256)


DEQUANTIZE = {
    "Q8_0": dequantize_q8_0,
    "Q5_0": dequantize_q5_0,
    "Q4_K": dequantize_q4_k,
    "Q6_K": dequantize_q6_k,
}


def dequantize(raw: torch.Tensor, fmt: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's raw uint8 bytes in block format `fmt`, dequantized to float32 of `shape`."""
    if fmt not in BLOCK_FORMATS:
        raise ValueError(
            f"unsupported GGUF block format {fmt!r}; supported: {', '.join(BLOCK_FORMATS)}"
        )
    values, size = BLOCK_FORMATS[fmt]
    count = 1
    for n in shape:
        count *= n
    if raw.dtype != torch.uint8 or raw.numel() * values != count * size:
        raise ValueError(
            f"{fmt} holds {values} values in {size} bytes: {count} values need "
            f"{count // values * size} uint8 bytes, got {raw.numel()} of {raw.dtype}"
        )
    return DEQUANTIZE[fmt](raw.reshape(-1, size)).reshape(shape)
