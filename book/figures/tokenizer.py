"""Figures and tables of the tokenizer page (ch3/01)."""

from __future__ import annotations

from helpers import show_figure

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import Rectangle

from minqwen.tokenizer import BPETokenizer

ITSELF, MOVED, MERGED, PLAIN = "#ffffff", "#fde5cc", "#f4b183", "#dbe9f6"


def byte_grid(table: dict[int, str]) -> None:
    """The 256 bytes in a 16 x 16 grid (row: high hex digit, column: low), each with the character BPE spells it
    with; bytes that stand for themselves are white, the 68 moved past U+0100 are orange."""
    fig, ax = plt.subplots(figsize=(8.4, 8.4))
    for byte, char in table.items():
        row, col = divmod(byte, 16)
        moved = ord(char) != byte
        ax.add_patch(
            Rectangle((col, row), 1, 1, facecolor=MOVED if moved else ITSELF, edgecolor="0.7")
        )
        ax.text(col + 0.5, row + 0.5, char, ha="center", va="center", fontsize=14)
    ax.set_xlim(0, 16)
    ax.set_ylim(16, 0)
    ax.set_xticks([c + 0.5 for c in range(16)], [f"_{c:X}" for c in range(16)], fontsize=10)
    ax.set_yticks([r + 0.5 for r in range(16)], [f"{r:X}_" for r in range(16)], fontsize=10)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_title(
        "Each byte's character in the BPE alphabet (white: the byte's own Latin-1 character;"
        "\norange: moved to U+0100 and up, in byte order)",
        fontsize=11,
    )
    ax.set_aspect("equal")
    show_figure(fig)


def bpe_steps(tokenizer: BPETokenizer, word: str) -> list[dict]:
    """`BPETokenizer.bpe` on one word, step by step: the merge applied and the symbols after it."""
    symbols, steps = list(word), [{"rank": None, "merge": None, "symbols": list(word)}]
    while True:
        ranked = [
            (tokenizer.merge_ranks[pair], pair)
            for pair in zip(symbols, symbols[1:])
            if pair in tokenizer.merge_ranks
        ]
        if not ranked:
            return steps
        rank, (left, right) = min(ranked)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (left, right):
                merged.append(left + right)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
        steps.append({"rank": rank, "merge": (left, right), "symbols": symbols})


def merge_steps(steps: list[dict], ids: list[int]) -> None:
    """One row per BPE step: the word's symbols as boxes, the pair just merged highlighted, its rank on the right."""
    word = "".join(steps[0]["symbols"])
    width = len(word)
    fig, ax = plt.subplots(figsize=(9.4, 0.62 * len(steps) + 1.0))
    for row, step in enumerate(steps):
        x = 0
        for symbol in step["symbols"]:
            fresh = step["merge"] is not None and symbol == "".join(step["merge"])
            ax.add_patch(
                Rectangle(
                    (x + 0.04, row + 0.12),
                    len(symbol) - 0.08,
                    0.76,
                    facecolor=MERGED if fresh else PLAIN,
                    edgecolor="0.4",
                )
            )
            ax.text(x + len(symbol) / 2, row + 0.5, symbol, ha="center", va="center", fontsize=13)
            x += len(symbol)
        if step["merge"] is None:
            label = "start: one symbol per byte"
        else:
            left, right = step["merge"]
            label = f"rank {step['rank']:>6,}:  {left} + {right}"
        ax.text(width + 0.4, row + 0.5, label, va="center", fontsize=11, family="monospace")
    ax.text(
        width + 0.4,
        len(steps) + 0.35,
        f"no ranked pair left: ids {ids}",
        va="center",
        fontsize=11,
        family="monospace",
    )
    ax.set_xlim(0, width + 8.5)
    ax.set_ylim(len(steps) + 0.8, 0)
    ax.axis("off")
    ax.set_title(f"BPE on the word {word!r}, one merge per row", fontsize=12, loc="left")
    show_figure(fig)


def token_table(tokenizer: BPETokenizer, text: str) -> pd.DataFrame:
    """One row per token of `text`: id, piece in the byte-level alphabet, its UTF-8 bytes, its text alone."""
    ids = tokenizer.encode(text)
    rows = []
    for i, piece in zip(ids, tokenizer.tokens(ids)):
        raw = bytes(tokenizer.char_to_byte[char] for char in piece)
        rows.append(
            {
                "id": i,
                "piece": piece,
                "bytes": raw.hex(" "),
                "text alone": repr(tokenizer.decode([i])),
            }
        )
    return pd.DataFrame(rows)
