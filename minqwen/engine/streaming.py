"""Streaming: text as it is produced, one token at a time, without ever printing half a character.

Byte-level BPE splits a character that takes several UTF-8 bytes (most Chinese characters, every emoji) across
tokens when the vocabulary lacks it whole. Decoding such a token alone gives U+FFFD, the replacement character.
`Detokenizer` therefore holds back text that ends in U+FFFD until the bytes that complete it arrive.

`stream()` runs generation (`minqwen.generate_tokens`, or a fast engine's own `generate_tokens`) and yields the
text pieces. It stops on an EOS id
or on a stop string. A stop string may be split across tokens. For that reason the stream holds back any tail of
the text that could still grow into a stop string, and it never emits text from the stop string on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial

import torch

from minqwen.engine.generate import generate_tokens
from minqwen.tokenizer import BPETokenizer

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Incremental decoding: `push(token_id)` returns the text that token completes ("" while a character is partial).

    It decodes a short window of ids rather than each id alone, so tokenizers whose decoding depends on the
    previous token (SentencePiece's leading space) also come out right. The pieces joined, plus `flush()`, equal
    `tokenizer.decode(all_ids, skip_special_tokens=...)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: the last token already emitted, kept for context
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back: bytes that never completed a character come out as U+FFFD."""
        emitted = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(emitted) :]


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that may still become one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = list(stop)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is now safe to emit; sets `stopped` once a stop string has appeared."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            safe, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return safe
        held = max(
            (n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])),
            default=0,
        )
        cut = len(self.pending) - held
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe

    def flush(self) -> str:
        safe, self.pending = self.pending, ""
        return safe


class Stream:
    """An iterator of text pieces. Once exhausted, `finish_reason` is "eos", "stop" or "length".

    `token_ids` holds the generated ids, including a final EOS. After a stop string it also holds the token
    that completed the stop string. `text` is everything emitted.
    """

    def __init__(
        self,
        tokens: Iterator[torch.Tensor],
        detokenizer: Detokenizer,
        eos_ids: set[int],
        stop: Sequence[str],
    ):
        self._tokens = tokens
        self._detokenizer = detokenizer
        self._eos_ids = eos_ids
        self._stop = StopMatcher(stop)
        self.token_ids: list[int] = []
        self.token_times: list[float] = []  # time.perf_counter() at each token's arrival
        self.text = ""
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces():
            if piece:
                self.text += piece
                yield piece

    def _pieces(self) -> Iterator[str]:
        if self.finish_reason is not None:
            return  # finished already: iterating again yields nothing and changes nothing
        try:
            for step in self._tokens:
                token = int(step.reshape(-1)[0])
                self.token_ids.append(token)
                self.token_times.append(time.perf_counter())
                if token in self._eos_ids:
                    self.finish_reason = "eos"
                    break
                yield self._stop.feed(self._detokenizer.push(token))
                if self._stop.stopped:
                    self.finish_reason = "stop"
                    return
            else:
                self.finish_reason = "length"
            yield self._stop.feed(self._detokenizer.flush())
            yield self._stop.flush()
        finally:
            # Closing the generator ends generation at once, instead of computing tokens nobody reads; a plain
            # iterator has nothing to close.
            close = getattr(self._tokens, "close", None)
            if close is not None:
                close()


def stream(
    model,
    tokenizer,
    prompt_or_ids: str | Sequence[int] | torch.Tensor,
    max_new_tokens: int = 256,
    *,
    stop: str | Iterable[str] | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    skip_special_tokens: bool = True,
    **sampling,
) -> Stream:
    """Generate for one prompt and yield its text as it is produced.

    `model` is a `Qwen2`, a `FastQwen2` engine or an `HFAdapter`; `tokenizer` is minqwen's `BPETokenizer` or a
    transformers tokenizer. `prompt_or_ids` is raw text, which is tokenized as is with no chat template, or token
    ids: a list, a 1-D tensor or a [1, seq] tensor. Generation stops at an EOS id, which is not emitted, or at the
    first stop string, which is not emitted either (OpenAI's convention). `eos_token_id` defaults to the
    checkpoint's end tokens and the tokenizer's. `sampling` takes the keywords of `minqwen.generate_tokens`
    (do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed), each defaulting to the checkpoint's.
    """
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    input_ids = _as_batch_of_one(tokenizer, prompt_or_ids)
    eos_ids = _eos_ids(model, tokenizer) if eos_token_id is None else _as_id_set(eos_token_id)
    produce = getattr(model, "generate_tokens", None)
    if produce is None:
        produce = partial(generate_tokens, model)
    tokens = produce(
        input_ids.to(_device(model)), max_new_tokens, eos_token_id=sorted(eos_ids), **sampling
    )
    return Stream(tokens, Detokenizer(tokenizer, skip_special_tokens), eos_ids, stop)


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _as_batch_of_one(tokenizer, prompt_or_ids) -> torch.Tensor:
    if isinstance(prompt_or_ids, str):
        ids = _encode(tokenizer, prompt_or_ids)
        if not ids:
            raise ValueError("the prompt is empty; streaming needs at least one prompt token")
        return torch.tensor([ids])
    ids = torch.as_tensor(prompt_or_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] != 1:
        raise ValueError(
            f"stream() takes one prompt, got a batch of {ids.shape[0]}; call minqwen.generate for batches"
        )
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(
            f"prompt ids must be a non-empty list, 1-D or [1, seq] tensor, got shape {tuple(ids.shape)}"
        )
    return ids.reshape(1, -1)


def _as_id_set(ids) -> set[int]:
    return {int(ids)} if isinstance(ids, int) else {int(i) for i in ids}


def _eos_ids(model, tokenizer) -> set[int]:
    """The checkpoint's end tokens (generation_config.json) and the tokenizer's own, if it names one."""
    ids = set(model.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
