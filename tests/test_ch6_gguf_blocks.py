"""Chapter 6: GGUF's block formats dequantized from their bytes, bit for bit as the gguf library does.

The reference is `gguf.quants.dequantize`, the Python twin of ggml's C code. Random blocks check every bit
pattern path of each format quickly; the embedded model's GGUF file checks every quantized tensor it holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from minqwen import weights
from minqwen.quant.gguf_blocks import BLOCK_FORMATS, dequantize, q4_k_scales_and_minimums

# Where each format keeps its float16 scales, which random bytes must not turn into NaN or infinity.
SCALE_BYTES = {"Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def random_blocks(fmt: str, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, size = BLOCK_FORMATS[fmt]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    for start in SCALE_BYTES[fmt]:
        scale = rng.uniform(-0.1, 0.1, count).astype(np.float16)
        blocks[:, start : start + 2] = scale.view(np.uint8).reshape(count, 2)
    return blocks


def same_bits(ours: torch.Tensor, theirs: np.ndarray) -> bool:
    theirs = torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32)).reshape(ours.shape)
    return torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("fmt", sorted(BLOCK_FORMATS))
def test_random_blocks_match_the_gguf_library_bit_for_bit(fmt):
    values, _ = BLOCK_FORMATS[fmt]
    blocks = random_blocks(fmt, 4096)
    ours = dequantize(torch.from_numpy(blocks).reshape(-1), fmt, (4096, values))
    assert same_bits(ours, gguf_dequantize(blocks, GGMLQuantizationType[fmt]))


def test_a_q8_0_block_is_its_scale_times_its_int8_values():
    q = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), q.view(np.uint8)])
    out = dequantize(torch.from_numpy(block), "Q8_0", (32,))
    assert out.tolist() == (q.astype(np.float32) * 0.5).tolist()


def test_a_q5_0_value_takes_its_fifth_bit_from_the_high_bits():
    # Value 0 has low nibble 15 and fifth bit 1: q = 31, x = d (31 - 16); every other value is q = 0, x = -16 d.
    block = np.zeros(22, dtype=np.uint8)
    block[0:2] = np.float16(0.25).reshape(1).view(np.uint8)
    block[2] = 1
    block[6] = 15
    out = dequantize(torch.from_numpy(block), "Q5_0", (32,))
    assert out[0].item() == 0.25 * 15 and (out[1:] == 0.25 * -16).all()


def test_q4_k_unpacks_six_bit_scales_and_minimums():
    scales, minimums = list(range(40, 48)), list(range(10, 18))
    packed = np.zeros(12, dtype=np.uint8)
    for j in range(4):
        packed[j] = scales[j] | ((scales[j + 4] >> 4) << 6)
        packed[j + 4] = minimums[j] | ((minimums[j + 4] >> 4) << 6)
        packed[j + 8] = (scales[j + 4] & 0x0F) | ((minimums[j + 4] & 0x0F) << 4)
    got_scales, got_minimums = q4_k_scales_and_minimums(torch.from_numpy(packed)[None])
    assert got_scales[0].tolist() == scales and got_minimums[0].tolist() == minimums


@pytest.mark.parametrize(
    "raw, fmt, shape, complaint",
    [
        (torch.zeros(34, dtype=torch.uint8), "Q4_0", (32,), "unsupported GGUF block format 'Q4_0'"),
        (torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,), "Q8_0 holds 32 values in 34 bytes"),
        (torch.zeros(34, dtype=torch.int8), "Q8_0", (32,), "got 34 of torch.int8"),
        (torch.zeros(34, dtype=torch.uint8), "Q8_0", (31,), "31 values need"),
    ],
)
def test_bad_input_is_one_clear_error(raw, fmt, shape, complaint):
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(").replace(".", r"\.")):
        dequantize(raw, fmt, shape)


def test_every_quantized_tensor_of_the_book_model_matches_the_gguf_library(embedded_path):
    gguf_file = weights.cache_dir() / "gguf" / weights.EMBEDDED["embedded"].gguf_name
    assert gguf_file.is_file(), (
        f"{gguf_file} is missing: delete {embedded_path} and fetch 'embedded' again"
    )
    checked = {}
    for tensor in GGUFReader(gguf_file).tensors:
        fmt = tensor.tensor_type.name
        if fmt == "F32":
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))
        raw = torch.from_numpy(np.array(tensor.data, copy=True)).reshape(-1)
        ours = dequantize(raw, fmt, shape)
        assert same_bits(ours, gguf_dequantize(tensor.data, tensor.tensor_type)), tensor.name
        checked[fmt] = checked.get(fmt, 0) + 1
    assert checked == {"Q5_0": 133, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
