"""Figures and tables of the weights page (ch0/01)."""

from __future__ import annotations

from helpers import show_figure

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import FancyBboxPatch, Rectangle

from minqwen import weights

CONFIG, TOKENIZER, TENSORS, CHECK = "#dff2df", "#fde5cc", "#dbe9f6", "#eeeeee"
MONO = dict(family="monospace", fontsize=9.5)


def human(n: int) -> str:
    """Bytes as a reader says them: 207 B, 11.4 MB, 2.52 GB (decimal units, as file browsers show)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def files_table(path: Path) -> pd.DataFrame:
    """One row per file of the manifest: its size and the first 16 hex digits of its sha256."""
    return pd.DataFrame(
        [
            {"file": name, "bytes": f"{(path / name).stat().st_size:,}", "sha256": digest[:16]}
            for name, digest in sorted(weights.read_manifest(path).items())
        ]
    ).set_index("file")


def describe(path: Path, name: str) -> tuple[str, str]:
    """What file `name` of the checkpoint holds, read from the file itself, and the colour of its role."""
    file = path / name
    if name == "config.json":
        c = json.loads(file.read_text())
        return (
            f"the architecture: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab {c['vocab_size']:,}",
            CONFIG,
        )
    if name == "generation_config.json":
        g = json.loads(file.read_text())
        keys = ("temperature", "top_k", "top_p", "repetition_penalty")
        shown = ", ".join(f"{k} {g[k]}" for k in keys if k in g)
        return f"sampling defaults: {shown}", CONFIG
    if name == "tokenizer.json":
        t = json.loads(file.read_text())
        return (
            f"{t['model']['type']}: {len(t['model']['vocab']):,} tokens, "
            f"{len(t['model']['merges']):,} merges, {len(t['added_tokens'])} special tokens",
            TOKENIZER,
        )
    if name == "tokenizer_config.json":
        t = json.loads(file.read_text())
        return (
            f"{t.get('tokenizer_class')}; eos {t.get('eos_token')}, pad {t.get('pad_token')}",
            TOKENIZER,
        )
    if name.endswith(".jinja"):
        return "the chat template (Jinja) that frames each message", TOKENIZER
    if name.endswith(".index.json"):
        shards = set(json.loads(file.read_text())["weight_map"].values())
        return f"which of the {len(shards)} .safetensors files holds each tensor", TENSORS
    if name.endswith(".safetensors"):
        header = read_header(file)[1]
        dtypes = sorted({h["dtype"] for h in header.values()})
        return f"{len(header)} tensors ({', '.join(dtypes)}): header + data, below", TENSORS
    if name == weights.MANIFEST:
        lines = file.read_text().splitlines()
        return f"sha256 of the {len(lines)} files below, checked on every fetch", CHECK
    return "", CHECK


def read_header(file: Path) -> tuple[int, dict]:
    """The length of a safetensors header and the header itself, without its __metadata__."""
    import struct

    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return length, header


def _group(name: str) -> str:
    if re.match(r"model\.layers\.\d+\.", name):
        return "layers"
    return {"lm_head.weight": "LM head", "model.embed_tokens.weight": "embedding"}.get(
        name, name.removeprefix("model.").removesuffix(".weight")
    )


def checkpoint_folder(path: Path, tensors_file: Path) -> None:
    """The files of the checkpoint folder with what each holds, and the byte layout of one .safetensors file."""
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    rows = len(names)
    fig = plt.figure(figsize=(9.6, 0.42 * rows + 3.4))
    ax = fig.add_axes((0, 0, 1, 1))
    top = rows + 0.6
    ax.set(xlim=(0, 12), ylim=(-4.1, top + 0.5))
    ax.axis("off")
    box = 0.105 * max(map(len, names)) + 0.3
    size_at, text_at = 0.25 + box + 1.05, 0.25 + box + 1.25
    ax.text(0, top, f"{path.name}/", fontsize=11, weight="bold", va="center", family="monospace")
    for i, name in enumerate(names):
        y = rows - i - 0.3
        text, color = describe(path, name)
        ax.add_patch(
            FancyBboxPatch(
                (0.25, y - 0.32), box, 0.64, boxstyle="round,pad=0.02", fc=color, ec="0.45"
            )
        )
        ax.text(0.35, y, name, va="center", **MONO)
        size = human((path / name).stat().st_size)
        ax.text(size_at, y, size, va="center", ha="right", fontsize=9.5)
        ax.text(text_at, y, text, va="center", fontsize=9.5)

    # One .safetensors file, left to right: 8 bytes of length, the JSON header, then the data block.
    length, header = read_header(tensors_file)
    y, h = -1.85, 0.8
    ax.text(
        0,
        y + 1.25,
        f"inside {tensors_file.name}, first byte to last (byte offsets above)",
        fontsize=10.5,
        weight="bold",
        va="center",
    )
    ax.add_patch(Rectangle((0, y - h / 2), 0.7, h, fc="white", ec="0.3"))
    ax.text(0.35, y, "8 B", ha="center", va="center", fontsize=9)
    ax.add_patch(Rectangle((0.7, y - h / 2), 2.0, h, fc=CHECK, ec="0.3"))
    ax.text(1.7, y, f"JSON header\n{length:,} B", ha="center", va="center", fontsize=9)
    spans = {}
    for name, h_ in header.items():
        start, end = h_["data_offsets"]
        group = _group(name)
        low, high = spans.get(group, (start, end))
        spans[group] = (min(low, start), max(high, end))
    total = max(end for _, end in spans.values())
    x0, width = 2.7, 12 - 2.7
    for group, (start, end) in sorted(spans.items(), key=lambda kv: kv[1]):
        left, w = x0 + width * start / total, width * (end - start) / total
        ax.add_patch(Rectangle((left, y - h / 2), w, h, fc=TENSORS, ec="0.3"))
        if w > 0.9:
            label = group if group != "layers" else f"{group} (in name order)"
            ax.text(left + w / 2, y, label, ha="center", va="center", fontsize=9)
    ax.text(0.35, y - 0.65, "u64 length", ha="center", va="top", fontsize=9)
    file_size = tensors_file.stat().st_size
    for x, offset in ((0, 0), (0.7, 8), (x0, 8 + length), (12, file_size)):
        ax.plot([x, x], [y + h / 2, y + h / 2 + 0.15], color="0.3", lw=0.8)
        align = "right" if x == 12 else ("left" if x == 0 else "center")
        ax.text(x, y + h / 2 + 0.2, f"{offset:,}", ha=align, va="bottom", fontsize=9)
    ax.text(
        x0 + width / 2,
        y - 0.65,
        f"data: {total:,} bytes, the tensors back to back (to scale)",
        ha="center",
        va="top",
        fontsize=9,
    )
    example = "model.norm.weight" if "model.norm.weight" in header else next(iter(header))
    entry = json.dumps({example: header[example]}, separators=(", ", ": "))
    ax.text(
        0.05,
        y - 1.3,
        f"one entry of the header:\n{entry}",
        va="top",
        family="monospace",
        fontsize=9,
    )
    show_figure(fig)
