"""Speculative decoding: a cheap drafter guesses the next tokens, the target checks them all in one forward pass.

A decode step of the target reads every weight to make one token. Fed k + 1 tokens instead of one, the same pass
reads the same weights and scores k + 1 positions. So a drafter proposes k tokens; the target runs once over the
last emitted token and the k drafts, and its logits at each position say whether the draft there is what the
target itself would have chosen. The tokens it accepts cost one target pass between them, and the first rejected
position is replaced by the target's own choice, so every round makes at least one token.

The rule (Leviathan et al. 2023; Chen et al. 2023) keeps the output distribution exactly the target's: draft token
x, drawn from the drafter's distribution q, is accepted with probability min(1, p(x) / q(x)), where p is the
target's; a rejection draws from the residual max(p - q, 0), normalized. Greedy decoding is the limit where p and
q put all their mass on one token: a draft is accepted when it is the target's argmax, so the tokens are the
target's own greedy tokens.

Two drafters: a smaller `Qwen2` of the same family (the book's 0.5B for its 1.5B), or `"prompt-lookup"`, which
copies what followed the last few tokens where they occurred earlier in the text. A drafter that copies is a point
mass, q(x) = 1, and the same rule holds. Batch 1 only: rows would accept different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from minqwen.engine.fast import CachedSpans, FastQwen2
from minqwen.engine.generate import check_finite
from minqwen.engine.request import GenerationRequest, prepare
from minqwen.engine.sampling import SamplingConfig, process_logits, select_next_token
from minqwen.model.qwen2 import Qwen2

Model = Qwen2 | FastQwen2

PROMPT_LOOKUP = "prompt-lookup"
DEFAULT_DRAFT_TOKENS = 4


@dataclass(frozen=True)
class SpeculativeStats:
    """What one generation's drafts achieved. A round is one verifying pass of the target."""

    rounds: int
    drafted: int
    accepted: int
    new_tokens: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted ones."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per round; each round also makes one token of the target's own."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per forward pass of the target, the prefill included: 1 without speculation."""
        return self.new_tokens / (self.rounds + 1)


class CachedModel:
    """A `Qwen2` with its KV cache: `extend` feeds tokens and returns the logits of each; `rollback` forgets the
    positions past a length, which is how rejected drafts leave the cache."""

    def __init__(self, model: Qwen2):
        self.model = model
        self.cache = model.new_cache()

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def extend(self, ids: list[int], *, last_only: bool = False) -> torch.Tensor:
        """float32 logits [len(ids), vocab], row i predicting the token after ids[i]; with `last_only`, the last
        row alone (a long prompt's logits would take gigabytes)."""
        device = self.model.embed_tokens.weight.device
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        return self.model(tokens, cache=self.cache, logits_to_keep=int(last_only))[0].float()

    def rollback(self, length: int) -> None:
        self.cache.crop(length)


@dataclass(frozen=True)
class PromptLookup:
    """Drafts by copying: find the last `n` tokens earlier in the text, for n from `max_ngram` down to
    `min_ngram`, and propose what followed their first occurrence. Costs no forward pass; proposes nothing
    where the text does not repeat."""

    max_ngram: int = 3
    min_ngram: int = 1

    def propose(self, tokens: list[int], count: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + count]
        return []


class SpeculativeDecoder:
    """A target model and a drafter, driven like an engine: `generate`, `generate_tokens`, and so
    `minqwen.stream` and the command line. `stats` describes the latest generation, round by round as it runs.

    `draft` is a smaller `Qwen2` sharing the target's tokenizer, or `"prompt-lookup"` (or a `PromptLookup` with
    its n-gram lengths). Each round drafts up to `num_draft_tokens` tokens and verifies them in one pass of the
    target. Everything is checked here, before any forward pass.
    """

    def __init__(
        self,
        target: Model,
        draft: Model | str | PromptLookup,
        *,
        num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ):
        draft = PromptLookup() if draft == PROMPT_LOOKUP else draft
        _check_models(target, draft, num_draft_tokens)
        self.target, self.draft, self.num_draft_tokens = target, draft, num_draft_tokens
        self.config = target.config
        self.device = _device_of(target)
        self.stats = SpeculativeStats(0, 0, 0, 0)

    def generate_tokens(
        self, input_ids: torch.Tensor, max_new_tokens: int, **settings
    ) -> Iterator[torch.Tensor]:
        """Yield each new token, [1], as `minqwen.generate_tokens` does: a round's accepted drafts come together."""
        request = prepare(self.config, input_ids, max_new_tokens, **settings)
        _check_request(request)
        return self._tokens(request)

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, **settings
    ) -> torch.LongTensor:
        """The prompt followed by the new tokens, [1, prompt + new], as `minqwen.generate` returns them."""
        new = [int(t) for t in self.generate_tokens(input_ids, max_new_tokens, **settings)]
        return torch.cat(
            [input_ids, torch.tensor([new], dtype=torch.long, device=input_ids.device)], dim=1
        )

    @torch.inference_mode()
    def _tokens(self, request: GenerationRequest) -> Iterator[torch.Tensor]:
        """The target's cache holds every token but the last emitted one, which opens the next round's pass."""
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sampling, k = request.sampling, self.num_draft_tokens
        sequence = request.input_ids[0].tolist()
        prompt = len(sequence)
        total = prompt + request.max_new_tokens + k + 1
        verifier = _cached(self.target, total, widths=(1, k + 1))
        drafter = self.draft
        if not isinstance(drafter, PromptLookup):
            drafter = _cached(self.draft, total, widths=(1, 2))
        self.stats = SpeculativeStats(0, 0, 0, 0)
        if request.max_new_tokens == 0:
            return
        logits = verifier.extend(sequence, last_only=True)
        check_finite(logits, 0)
        new = [int(_choose(logits, sequence, sampling)[0])]
        while True:
            for token in new:
                sequence.append(token)
                self.stats = replace(self.stats, new_tokens=self.stats.new_tokens + 1)
                yield torch.tensor([token], device=self.device)
                if token in request.eos_ids or len(sequence) - prompt == request.max_new_tokens:
                    return
            room = request.max_new_tokens - (len(sequence) - prompt) - 1
            drafts, q = _draft(drafter, sequence, min(k, room), sampling, request.eos_ids)
            logits = verifier.extend(sequence[-1:] + drafts)
            check_finite(logits, len(sequence) - prompt)
            kept, extra = _verify(logits, drafts, q, sequence, sampling)
            verifier.rollback(len(sequence) + kept)
            new = drafts[:kept] + [extra]
            s = self.stats
            self.stats = replace(
                s, rounds=s.rounds + 1, drafted=s.drafted + len(drafts), accepted=s.accepted + kept
            )


def speculative_generate(
    target: Model,
    draft: Model | str | PromptLookup,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    return_stats: bool = False,
    **settings,
):
    """The prompt followed by the new tokens, [1, prompt + new], as `minqwen.generate` returns them, made by
    `SpeculativeDecoder(target, draft, num_draft_tokens=...)`.

    `settings` are `minqwen.generate`'s (sampling, seed, end tokens), with the same defaults. Greedy output is the
    target's own greedy output; sampled output has the target's distribution (its draws differ). With
    `return_stats=True` it returns `(tokens, SpeculativeStats)`.
    """
    decoder = SpeculativeDecoder(target, draft, num_draft_tokens=num_draft_tokens)
    tokens = decoder.generate(input_ids, max_new_tokens, **settings)
    return (tokens, decoder.stats) if return_stats else tokens


def _check_models(target, draft, num_draft_tokens) -> None:
    if not isinstance(target, Model):
        raise ValueError(
            f"the target must be a minqwen Qwen2 or FastQwen2, got {type(target).__name__}; load one with "
            f"Qwen2.from_pretrained"
        )
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    if num_draft_tokens < 1:
        raise ValueError(
            f"num_draft_tokens must be >= 1, got {num_draft_tokens}; for no speculation at all use "
            f"minqwen.generate"
        )
    if isinstance(draft, PromptLookup):
        if not 1 <= draft.min_ngram <= draft.max_ngram:
            raise ValueError(
                f"PromptLookup needs 1 <= min_ngram <= max_ngram, got {draft.min_ngram} and "
                f"{draft.max_ngram}"
            )
        return
    if not isinstance(draft, Model):
        raise ValueError(
            f"draft must be a minqwen Qwen2, a FastQwen2 or {PROMPT_LOOKUP!r}, got {draft!r:.60}; load a "
            f"smaller model of the target's family with Qwen2.from_pretrained"
        )
    if draft is target and isinstance(target, FastQwen2):
        raise ValueError(
            "the draft is the target's own FastQwen2, whose one span cache both would write; wrap the model "
            "in a second FastQwen2 for the draft"
        )
    draft_vocab, target_vocab = draft.config.vocab_size, target.config.vocab_size
    if draft_vocab > target_vocab:
        # A smaller one is a shorter padding of the same tokenizer (Qwen2.5 0.5B-3B pad to 151,936, 7B on to
        # 152,064): q is 0 past its end. Two tokenizers of one size look alike here; their drafts would fail.
        raise ValueError(
            f"the draft's vocabulary ({draft_vocab:,} ids) is larger than the target's ({target_vocab:,}): its "
            f"drafts could be ids the target cannot read. A draft must share the target's tokenizer, as the "
            f"Qwen2.5 sizes do"
        )
    target_device, draft_device = _device_of(target), _device_of(draft)
    if draft_device != target_device:
        raise ValueError(
            f"the draft is on {draft_device} and the target on {target_device}; move the draft with "
            f"draft.to('{target_device}')"
        )


def _device_of(model: Model) -> torch.device:
    return model.device if isinstance(model, FastQwen2) else model.embed_tokens.weight.device


def _cached(model: Model, total: int, widths: tuple[int, ...]):
    """The model with a cache of its own for one generation of `total` positions: spans of up to max(widths)
    tokens run as CUDA graphs on a fast engine."""
    if isinstance(model, FastQwen2):
        return CachedSpans(model, model.capacity_for(total), widths)
    return CachedModel(model)


def _check_request(request: GenerationRequest) -> None:
    if request.input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding takes one prompt (batch 1), got {request.input_ids.shape[0]}: rows would "
            f"accept different numbers of drafts. Call it once per prompt, or use minqwen.generate for a batch"
        )
    if request.padded:
        raise ValueError(
            "the prompt is left-padded; a single prompt needs no padding: drop the padded columns"
        )


def _choose(scores_from: torch.Tensor, previous: list[int], sampling: SamplingConfig):
    """The next token after `previous`, by the eager loop's own processors and draw."""
    history = torch.tensor([previous], device=scores_from.device)
    return select_next_token(process_logits(scores_from, history, sampling), sampling)


def _probabilities(logits: torch.Tensor, previous: list[int], sampling: SamplingConfig):
    """The distribution a token is drawn from after `previous`: processed scores, softmaxed."""
    history = torch.tensor([previous], device=logits.device)
    return process_logits(logits[None], history, sampling).softmax(dim=-1)[0]


def until_end(drafts: list[int], eos_ids) -> list[int]:
    """The drafts up to and including the first end token: nothing after it is ever emitted."""
    end = next((i for i, token in enumerate(drafts) if token in eos_ids), None)
    return drafts if end is None else drafts[: end + 1]


def _draft(drafter, sequence: list[int], count: int, sampling: SamplingConfig, eos_ids=()):
    """Up to `count` drafted tokens, and for a model drafter the distributions q they were drawn from (None
    for a copy, whose q is a point mass)."""
    if count == 0:
        return [], None
    if isinstance(drafter, PromptLookup):
        return until_end(drafter.propose(sequence, count), eos_ids), None
    # The drafter's cache is valid up to where its own earlier drafts and the text part; the text's last token
    # or two (the target's correction, or the last draft and the bonus token) are fed again.
    drafter.rollback(min(drafter.length, len(sequence) - 1))
    logits = drafter.extend(sequence[drafter.length :], last_only=True)[0]
    drafts, q = [], []
    for i in range(count):
        probs = _probabilities(logits, sequence + drafts, sampling)
        token = int(probs.argmax()) if sampling.greedy else int(torch.multinomial(probs, 1))
        drafts.append(token)
        q.append(probs)
        if token in eos_ids:  # nothing after an end token is ever emitted
            break
        if i + 1 < count:
            logits = drafter.extend([token])[-1]
    return drafts, q


def _verify(logits, drafts: list[int], q, sequence: list[int], sampling: SamplingConfig):
    """How many drafts the target keeps, and the token it adds after them: its own choice where it rejected
    one, or a bonus token where it kept all. `logits[i]` is the target's prediction after drafts[:i]."""
    for i, token in enumerate(drafts):
        context = sequence + drafts[:i]
        if sampling.greedy:
            choice = int(_choose(logits[i : i + 1], context, sampling)[0])
            if choice != token:
                return i, choice
            continue
        p = _probabilities(logits[i], context, sampling)
        if q is None:  # a copied draft: all its probability on the token
            proposal = torch.zeros_like(p).index_fill_(0, torch.tensor(token, device=p.device), 1)
        else:  # a draft's padded vocabulary may be shorter; q is 0 past its end
            proposal = torch.nn.functional.pad(q[i], (0, p.shape[0] - q[i].shape[0]))
        replacement = accept_or_resample(p, proposal, token)
        if replacement is not None:
            return i, replacement
    last = sequence + drafts
    return len(drafts), int(_choose(logits[len(drafts) :][:1], last, sampling)[0])


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int) -> int | None:
    """The speculative sampling rule for one draft `token` drawn from q: None if it stands, which happens with
    probability min(1, p(token) / q(token)); otherwise a token drawn from the residual in its place."""
    if torch.rand(()) < p[token] / q[token]:
        return None
    return int(torch.multinomial(residual(p, q), 1))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0), normalized: where the target wants more than the draft offered."""
    excess = (p - q).clamp_min(0)
    total = excess.sum()
    # A rejection means some excess is left; rounding can leave none when p equals q.
    return excess / total if total > 0 else p
