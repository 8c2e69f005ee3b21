"""Seeded client traffic: Poisson arrivals with a realistic mix of prompt and output lengths
(chat turns, retrieval-augmented prompts, long documents)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

# (share, mean prompt tokens, mean output tokens)
MIX = (
    (0.60, 300, 250),  # chat
    (0.30, 2_000, 300),  # retrieval-augmented
    (0.10, 6_000, 600),  # long documents, summaries
)


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def requests(rate_per_s: float, duration_s: float, rng: random.Random) -> Iterator[SimRequest]:
    """Arrivals over `duration_s` simulated seconds; lengths exponential around each mix
    entry's mean (heavy enough tails), at least 1 token."""
    t, index = 0.0, 0
    shares = [m[0] for m in MIX]
    while True:
        t += rng.expovariate(rate_per_s)
        if t > duration_s:
            return
        _share, prompt, output = rng.choices(MIX, shares)[0]
        yield SimRequest(
            index,
            t,
            max(1, min(int(rng.expovariate(1 / prompt)), 16_000)),
            max(1, min(int(rng.expovariate(1 / output)), 2_048)),
        )
        index += 1


def mean_job_tokens() -> tuple[float, float]:
    """Mean (prompt, output) tokens of the mix (before capping)."""
    shares = sum(m[0] for m in MIX)
    return (
        sum(m[0] * m[1] for m in MIX) / shares,
        sum(m[0] * m[2] for m in MIX) / shares,
    )
