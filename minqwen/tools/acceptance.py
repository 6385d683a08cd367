"""How many drafts a target accepts, for every draft length, from one greedy generation.

Under greedy decoding the output does not depend on the drafter, so a round that starts at position i accepts
drafts for as long as the drafter's guesses equal the output's next tokens. A model drafter guesses from the
output itself while it is right, so one teacher-forced pass of the draft over the target's output gives every
guess it would make (`draft_hits`); prompt lookup is replayed directly. `replay_rounds` then plays the rounds of
`SpeculativeDecoder` for any draft length, without running the target again.
"""

from __future__ import annotations

import torch

from minqwen.engine.sampling import SamplingConfig, process_logits
from minqwen.engine.speculative import SpeculativeStats, until_end


@torch.inference_mode()
def draft_hits(draft, tokens: list[int], prompt: int, sampling: SamplingConfig) -> list[bool]:
    """For each new token after the first: whether the draft's greedy choice, given everything before it, was it."""
    device = draft.embed_tokens.weight.device
    ids = torch.tensor([tokens[:-1]], device=device)
    logits = draft(ids)[0, prompt - 1 :].float()
    hits = []
    for i in range(1, len(tokens) - prompt):
        position = prompt + i
        history = torch.tensor([tokens[:position]], device=device)
        scores = process_logits(logits[i : i + 1], history, sampling)
        hits.append(int(scores.argmax()) == tokens[position])
    return hits


def replay_rounds(
    tokens: list[int],
    prompt: int,
    max_new_tokens: int,
    k: int,
    *,
    hits=None,
    lookup=None,
    eos_ids=(),
) -> SpeculativeStats:
    """The rounds `SpeculativeDecoder` runs to make `tokens[prompt:]` with drafts of up to `k`: from a model
    drafter's `hits` (`draft_hits`), or by replaying a `PromptLookup` whose drafts stop at `eos_ids`."""
    new = len(tokens) - prompt
    position, rounds, drafted, accepted = 1, 0, 0, 0  # the first new token comes from the prefill
    while position < new:
        room = min(k, max_new_tokens - position - 1)
        if lookup is not None:
            proposal = lookup.propose(tokens[: prompt + position], room) if room else []
            proposal = until_end(proposal, eos_ids)
            actual = tokens[prompt + position : prompt + position + len(proposal)]
            matched = [a == b for a, b in zip(proposal, actual)]
            count = len(proposal)
        else:
            matched, count = hits[position - 1 : position - 1 + room], room
        kept = next((i for i, hit in enumerate(matched) if not hit), len(matched))
        rounds, drafted, accepted = rounds + 1, drafted + count, accepted + kept
        position += kept + 1
    return SpeculativeStats(rounds, drafted, accepted, new)
