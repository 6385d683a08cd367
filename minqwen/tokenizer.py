"""Qwen2.5's tokenizer from scratch: byte-level BPE read from tokenizer.json, and the ChatML chat template.

Encoding a string takes four steps, the same four that Hugging Face's `Qwen2Tokenizer` runs:

1. **split out the added tokens** (``<|im_start|>``, ``<|endoftext|>``, ...), which map straight to their ids;
2. **normalize** each remaining piece to Unicode NFC;
3. **pre-tokenize**: cut the piece into words with the Qwen2 regex (digits one by one, letters with at most one
   leading non-letter, punctuation runs, whitespace runs), then spell each word's UTF-8 bytes as printable
   characters with the GPT-2 byte-to-unicode table;
4. **BPE**: start from one symbol per byte and repeatedly merge the adjacent pair with the lowest merge rank.

Decoding reverses the byte spelling. `render_chat` writes the ChatML prompt that the model was trained on, without
jinja.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import regex

from minqwen.model.config import LoadError, read_json

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHAT_ROLES = ("system", "user", "assistant", "tool")
_WORD_CACHE_LIMIT = 1 << 18


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table giving each of the 256 bytes a printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen, ...) are moved to
    U+0100 onward in byte order, so a space is spelled ``Ġ`` (U+0120) and a newline ``Ċ`` (U+010A). Every token
    in the vocabulary is a string over these 256 characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool


class BPETokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer regex, built from a tokenizer.json.

    ``normalization`` is ``"NFC"`` or ``None``. transformers' `Qwen2Tokenizer` always normalizes to NFC, whatever
    the file says, so NFC (the default) reproduces `AutoTokenizer`; ``None`` reproduces the file as the
    ``tokenizers`` library reads it, which for a tokenizer rebuilt from a GGUF has no normalizer.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pattern: str,
        added_tokens: list[AddedToken],
        normalization: str | None = "NFC",
    ):
        if normalization not in ("NFC", None):
            raise ValueError(f"normalization must be 'NFC' or None, not {normalization!r}")
        self.vocab = vocab
        self.id_to_token = {i: token for token, i in vocab.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pattern = regex.compile(pattern)
        self.added_tokens = {t.content: t for t in added_tokens}
        self.added_by_id = {t.id: t for t in added_tokens}
        # Longest first, so that a token that is a prefix of another never wins the match.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self.added_pattern = (
            regex.compile("|".join(map(regex.escape, alternatives))) if alternatives else None
        )
        self.normalization = normalization
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {char: byte for byte, char in self.byte_to_char.items()}
        self.size = max([*self.id_to_token, *self.added_by_id]) + 1
        self._word_cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path: str | Path, normalization: str | None = "NFC") -> BPETokenizer:
        """Read a byte-level BPE tokenizer.json (or a folder holding one); a LoadError names what is wrong."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise LoadError(
                f"no tokenizer.json at {path}: the checkpoint lacks its tokenizer. Pass a checkpoint folder "
                f"or the file itself, or restore the file (fetch the checkpoint again)"
            )
        spec = read_json(path, LoadError)
        model = spec.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise LoadError(f"{path} holds a {kind!r} model; only byte-level BPE is supported")
        pattern = _split_pattern(spec.get("pre_tokenizer"))
        if pattern is None:
            raise LoadError(
                f"{path} has no Split(regex) + ByteLevel pre-tokenizer; it is not a Qwen2-style file"
            )
        if not isinstance(model.get("vocab"), dict) or not model["vocab"]:
            raise LoadError(
                f"{path} has no vocabulary (model.vocab); restore the file or fetch the checkpoint again"
            )
        try:
            merges = [
                tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]
            ]
            added = [
                AddedToken(t["content"], t["id"], t["special"])
                for t in spec.get("added_tokens", [])
            ]
            return cls(model["vocab"], merges, pattern, added, normalization)
        except (KeyError, TypeError, AttributeError, regex.error) as error:
            raise LoadError(
                f"{path} is not a complete tokenizer.json ({type(error).__name__}: {error}); restore the "
                f"file or fetch the checkpoint again"
            ) from None

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Added tokens written in the text (``<|im_start|>``...) become their ids."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, not {type(text).__name__}")
        ids: list[int] = []
        for piece, added in self._split_added(text):
            if added is not None:
                ids.append(added.id)
            else:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """The words BPE sees, spelled in the byte-level alphabet (no added-token handling)."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        return [
            "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
            for word in self.pattern.findall(text)
        ]

    def bpe(self, word: str) -> list[str]:
        """Merge one byte-level word: always the adjacent pair of lowest rank, every occurrence left to right."""
        symbols = list(word)
        while len(symbols) > 1:
            ranked = [(self.merge_ranks.get(pair, -1), pair) for pair in zip(symbols, symbols[1:])]
            candidates = [(rank, pair) for rank, pair in ranked if rank >= 0]
            if not candidates:
                break
            _, (left, right) = min(candidates)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Byte sequences that are not valid UTF-8 (a token cut inside a character) become U+FFFD."""
        out, pending = [], bytearray()
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.size:
                raise ValueError(f"token id {i!r} is not an int in [0, {self.size})")
            added = self.added_by_id.get(i)
            if added is None:
                pending.extend(self.char_to_byte[char] for char in self.id_to_token[i])
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not (skip_special_tokens and added.special):
                out.append(added.content)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def tokens(self, ids: list[int]) -> list[str]:
        """The vocabulary strings of ``ids``, in the byte-level alphabet."""
        return [
            self.added_by_id[i].content if i in self.added_by_id else self.id_to_token[i]
            for i in ids
        ]

    def _split_added(self, text: str):
        """Yield (text, None) for ordinary stretches and (content, AddedToken) for each added token."""
        start = 0
        if self.added_pattern is not None:
            for match in self.added_pattern.finditer(text):
                if match.start() > start:
                    yield text[start : match.start()], None
                yield match.group(), self.added_tokens[match.group()]
                start = match.end()
        if start < len(text):
            yield text[start:], None

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for word in self.pre_tokenize(text):
            cached = self._word_cache.get(word)
            if cached is None:
                cached = [self.vocab[symbol] for symbol in self.bpe(word)]
                if len(self._word_cache) >= _WORD_CACHE_LIMIT:
                    self._word_cache.clear()
                self._word_cache[word] = cached
            ids.extend(cached)
        return ids


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex of a Sequence[Split(Regex, isolated), ByteLevel(use_regex=False)] pre-tokenizer, else None."""
    if not pre_tokenizer or pre_tokenizer.get("type") != "Sequence":
        return None
    steps = pre_tokenizer.get("pretokenizers", [])
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        return None
    split, byte_level = steps
    if (
        split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split.get("pattern", {})
    ):
        return None
    if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML prompt for ``messages``, written out by hand (Qwen2.5's template without tool definitions).

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. A conversation that does not open with a
    system message gets Qwen's default one. Consecutive ``tool`` messages share one user turn, each wrapped in
    ``<tool_response>``. ``add_generation_prompt`` appends the opening of the assistant's turn.
    """
    _check_messages(messages)
    if messages[0]["role"] == "system":
        parts = [f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n"]
        rest = messages[1:]
    else:
        parts = [f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"]
        rest = messages
    previous_role = None
    for index, message in enumerate(rest):
        role, content = message["role"], message["content"]
        if role != "tool":
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        else:
            if previous_role != "tool":
                parts.append("<|im_start|>user")
            parts.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if index + 1 == len(rest) or rest[index + 1]["role"] != "tool":
                parts.append("<|im_end|>\n")
        previous_role = role
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"message {index} is a {type(message).__name__}, not a dict with 'role' and 'content'"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(
                f"message {index} has role {role!r}; use one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {index} ({role}) needs a str 'content', got {message.get('content')!r}"
            )
        extra = set(message) - {"role", "content"}
        if extra:
            raise ValueError(
                f"message {index} has keys {sorted(extra)} that render_chat does not handle (tool calls and such); "
                "use the HF tokenizer's apply_chat_template for those"
            )
