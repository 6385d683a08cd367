"""Figures of the streaming page (ch4/04)."""

from __future__ import annotations

from helpers import show_figure

import unicodedata

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from minqwen.engine.streaming import REPLACEMENT, Detokenizer
from minqwen.tokenizer import BPETokenizer

CHAR_COLORS = ["#c6dbef", "#fdd0a2", "#c7e9c0", "#dadaeb"]
HELD, SHOWN = "#f0f0f0", "#ffffff"


def printable(text: str) -> str:
    """`text` with every character the figure's font lacks (CJK, emoji) written as its code point."""
    return "".join(
        ch if ch == REPLACEMENT or ord(ch) < 0x2000 else f"[U+{ord(ch):04X}]" for ch in text
    )


def token_bytes(tokenizer: BPETokenizer, token_id: int) -> bytes:
    return bytes(tokenizer.char_to_byte[ch] for ch in tokenizer.id_to_token[token_id])


def split_characters(tokenizer: BPETokenizer, text: str) -> list[dict]:
    """What a stream sees token by token: each token's bytes, the decode of all tokens so far, and what
    `Detokenizer.push` emits."""
    ids, detokenizer, rows = tokenizer.encode(text), Detokenizer(tokenizer), []
    for k, token in enumerate(ids):
        rows.append(
            {
                "token id": token,
                "bytes": token_bytes(tokenizer, token).hex(" ").upper(),
                "decode(tokens so far)": printable(tokenizer.decode(ids[: k + 1])),
                "Detokenizer.push emits": printable(detokenizer.push(token)) or "(held back)",
            }
        )
    return rows


def byte_split(tokenizer: BPETokenizer, text: str) -> None:
    """Characters (top), their UTF-8 bytes, the tokens the bytes fall into, and after each token the decode of
    everything so far and what the detokenizer lets out."""
    ids = tokenizer.encode(text)
    chars = [(ch, len(ch.encode())) for ch in text]
    n_bytes = sum(n for _, n in chars)
    fig, ax = plt.subplots(figsize=(10.4, 4.6))
    # characters and their bytes
    x = 0
    for i, (ch, n) in enumerate(chars):
        color = CHAR_COLORS[i % len(CHAR_COLORS)]
        ax.add_patch(Rectangle((x, 4), n, 0.8, facecolor=color, edgecolor="0.4"))
        name = unicodedata.name(ch, "").lower()
        name = "CJK ideograph" if name.startswith("cjk") else name
        ax.text(x + n / 2, 4.4, f"U+{ord(ch):04X}\n{name}", ha="center", va="center", fontsize=9)
        for b in ch.encode():
            ax.add_patch(Rectangle((x, 3), 1, 0.8, facecolor=color, edgecolor="0.4"))
            ax.text(
                x + 0.5, 3.4, f"{b:02X}", ha="center", va="center", fontsize=10, family="monospace"
            )
            x += 1
    # tokens, and what each one lets through
    x, detokenizer = 0, Detokenizer(tokenizer)
    for k, token in enumerate(ids):
        n = len(token_bytes(tokenizer, token))
        ax.add_patch(
            Rectangle((x + 0.05, 2), n - 0.1, 0.8, facecolor="#e5f5e0", edgecolor="#31a354")
        )
        ax.text(x + n / 2, 2.4, f"token {token}", ha="center", va="center", fontsize=9)
        so_far = printable(tokenizer.decode(ids[: k + 1]))
        emitted = printable(detokenizer.push(token))
        ax.text(x + n / 2, 1.45, so_far, ha="center", va="center", fontsize=9)
        ax.add_patch(
            Rectangle(
                (x + 0.05, 0.1), n - 0.1, 0.7, facecolor=SHOWN if emitted else HELD, edgecolor="0.6"
            )
        )
        ax.text(x + n / 2, 0.45, emitted or "held back", ha="center", va="center", fontsize=9)
        x += n
    for y, label in (
        (4.4, "character"),
        (3.4, "UTF-8 bytes"),
        (2.4, "BPE tokens"),
        (1.45, "decode(tokens so far)"),
        (0.45, "Detokenizer emits"),
    ):
        ax.text(-0.3, y, label, ha="right", va="center", fontsize=10)
    ax.set_xlim(-3.6, n_bytes + 1.2)
    ax.set_ylim(0, 5)
    ax.axis("off")
    ax.set_title(
        f"{len(chars)} characters, {n_bytes} bytes, {len(ids)} tokens: "
        f"U+FFFD ({REPLACEMENT}) until a character's last byte arrives",
        fontsize=11,
    )
    show_figure(fig)
