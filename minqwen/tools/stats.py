"""Is a sampler right? Pearson's chi-square test of observed draws against the distribution they should follow.

Equal tokens prove a deterministic path; a sampler that draws differently (the fast engine's, a speculative
decoder's) can only be shown right in distribution. `chi_square` says how surprising the observed counts are if
the draws came from `probs`: a p-value far below 0.01 means they did not.
"""

from __future__ import annotations

import torch


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's statistic, degrees of freedom and p-value of `counts` [k] against `probs` [k].

    Categories with probability zero must have no draws (a draw there is impossible: p = 0). Categories expected
    fewer than 5 times are pooled into one, where the test's approximation would not hold. The p-value is the
    upper regularized gamma function, so no scipy is needed.
    """
    counts, probs = counts.double().cpu(), probs.double().cpu()
    possible = probs > 0
    if counts[~possible].sum() > 0:
        return float("inf"), int(possible.sum()) - 1, 0.0
    counts, expected = counts[possible], probs[possible] / probs[possible].sum() * counts.sum()
    rare = expected < 5
    if rare.any():
        counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    p_value = float(
        torch.special.gammaincc(
            torch.tensor(dof / 2, dtype=torch.float64),
            torch.tensor(statistic / 2, dtype=torch.float64),
        )
    )
    return statistic, dof, p_value
