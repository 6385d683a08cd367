"""A corpus for testing tokenizers: seeded strings of code, Chinese, English, emoji, random Unicode, whitespace
runs, numbers and mixtures, with added tokens and NFD-decomposed text among them.

The tokenizer page of the book and tests/test_ch3_tokenizer.py both compare minqwen's BPE with transformers' on
it. It is test data, so it lives beside the book rather than in the package.
"""

from __future__ import annotations

import importlib.util
import random
import unicodedata
from pathlib import Path

# A corpus for checking an encoder against a reference. Every string comes from a seeded generator, so the corpus
# is the same on every machine with the same pinned packages (the code snippets are read from their sources).
_CODE_MODULES = ("regex._regex_core", "tqdm.std", "safetensors.torch")
_CHINESE = (
    "我们今天学习如何从零开始实现一个语言模型。",
    "分词器把文本切成词元，模型只认识词元的编号。",
    "北京的秋天天气晴朗，适合出去走走。",
    "这段代码的时间复杂度是多少？",
    "请用简体中文回答下面的问题：什么是注意力机制？",
    "人工智能正在改变软件开发的方式。",
    "他说：“明天见！”然后就走了。",
    "《红楼梦》是中国古典小说的巅峰之作。",
    "数据一共有一千二百三十四条，其中百分之五是噪声。",
    "通义千问是阿里云研发的大语言模型。",
    "鹦鹉、麒麟、饕餮和魑魅魍魉都是不常见的字。",
    "我爱吃饺子，也爱吃面条。",
)
_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "It's a tokenizer; they'll see what we've done, and I'd say you're right.",
    "DON'T PANIC. SHE'S HERE AND WE'RE READY, AREN'T WE?",
    "Byte-level BPE never needs an <unk> token: every byte has one.",
    "e.g. Mr. Smith paid $1,234.56 on 2024-03-15 at 09:30 a.m.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "naïve café résumé coöperate façade jalapeño Zürich",
    "Email me at first.last+tag@example.co.uk or visit https://example.org/a?b=c&d=e#f",
)
_EMOJI = (
    "😀",
    "😂",
    "🥲",
    "👍",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🧑🏿‍💻",
    "🏳️‍🌈",
    "🇨🇳",
    "🇺🇸",
    "🇯🇵",
    "1️⃣",
    "#️⃣",
    "❤️",
    "✨",
    "🚀",
    "🐍",
    "🦀",
    "🤖",
    "🍜",
    "🀄",
    "☕",
    "⚡",
    "🫠",
    "🧪",
)
_SPACES = (
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\n\n",
    "    ",
    "\u3000",
    "\xa0",
    "\x0b",
    "\x0c",
    "\u2028",
    "\x85",
    "\u200b",
)
_NUMERALS = ("０１２３", "٣٤٥", "²³", "½", "Ⅻ", "一二三", "१२३", "①②")
# Code point ranges fully assigned for decades, so that Unicode-table versions cannot make the check flaky.
_UNICODE_RANGES = (
    (0x00A1, 0x00FF),
    (0x0100, 0x017F),
    (0x0300, 0x036F),
    (0x0391, 0x03A1),
    (0x03A3, 0x03C9),
    (0x0400, 0x04FF),
    (0x05D0, 0x05EA),
    (0x0621, 0x063A),
    (0x0641, 0x064A),
    (0x0905, 0x0939),
    (0x0E01, 0x0E3A),
    (0x2010, 0x2027),
    (0x2190, 0x21FF),
    (0x2200, 0x22FF),
    (0x2500, 0x257F),
    (0x3041, 0x3096),
    (0x30A1, 0x30FA),
    (0x4E00, 0x9FA5),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1F5FF),
    (0x1F600, 0x1F64F),
)


def sample_corpus(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (category, text) pairs, cycling through code, Chinese, English, emoji, random Unicode, whitespace
    runs, numbers and mixtures of all of these (with added tokens and NFD-decomposed text among them)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = random.Random(seed)
    code_lines = []
    for name in _CODE_MODULES:
        code_lines.extend(
            Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8").splitlines(True)
        )
    chinese_chars = "".join(_CHINESE)
    added = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<|fim_middle|>")

    def code():
        start = rng.randrange(len(code_lines))
        return "".join(code_lines[start : start + rng.randint(1, 12)])

    def chinese():
        if rng.random() < 0.5:
            return "".join(rng.choices(_CHINESE, k=rng.randint(1, 3)))
        return "".join(rng.choices(chinese_chars, k=rng.randint(1, 40)))

    def english():
        words = " ".join(rng.choices(_ENGLISH, k=rng.randint(1, 2))).split(" ")
        start = rng.randrange(len(words))
        return " ".join(words[start : start + rng.randint(1, 25)])

    def emoji():
        return "".join(
            rng.choice(_EMOJI) + rng.choice(("", "", " ", "ok", "\n"))
            for _ in range(rng.randint(1, 8))
        )

    def random_unicode():
        chars = []
        for _ in range(rng.randint(1, 30)):
            low, high = rng.choice(_UNICODE_RANGES)
            chars.append(
                chr(rng.randint(low, high)) if rng.random() < 0.8 else rng.choice(" a1.,\n")
            )
        return "".join(chars)

    def whitespace():
        pieces = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.6:
                pieces.append(rng.choice(_SPACES) * rng.randint(1, 4))
            else:
                pieces.append(rng.choice(("x", "if", "1", "中", "!", "é")))
        return "".join(pieces)

    def numbers():
        forms = (
            lambda: str(rng.randint(-(10**12), 10**12)),
            lambda: f"{rng.uniform(-1e4, 1e4):.{rng.randint(0, 8)}f}",
            lambda: f"{rng.randint(0, 10**9):,}",
            lambda: f"{rng.uniform(0, 1):.3e}",
            lambda: f"0x{rng.getrandbits(32):08x}",
            lambda: rng.choice(_NUMERALS),
            lambda: f"v{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
        )
        return rng.choice(("", " ", ", ", "=")).join(
            rng.choice(forms)() for _ in range(rng.randint(1, 6))
        )

    def mixed():
        parts = [rng.choice(generators[:-1])() for _ in range(rng.randint(2, 4))]
        if rng.random() < 0.4:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(added))
        text = rng.choice(("", " ", "\n")).join(parts)
        return unicodedata.normalize("NFD", text) if rng.random() < 0.2 else text

    generators = (code, chinese, english, emoji, random_unicode, whitespace, numbers, mixed)
    chosen = [generators[i % len(generators)] for i in range(count)]
    return [(generate.__name__, generate()) for generate in chosen]
