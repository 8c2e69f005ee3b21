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
    conversation: int = -1  # a chat's turn: which conversation (-1: a single request)
    shared_tokens: int = 0  # the prompt's tokens that are the conversation's previous turn


CONTINUE = 0.75  # with conversations: the share of chat requests that are a next turn
ACTIVE_S = 30.0  # … of one of the conversations started in about this many seconds
MAX_PROMPT = 16_000


def requests(
    rate_per_s: float, duration_s: float, rng: random.Random, conversations: bool = False
) -> Iterator[SimRequest]:
    """Arrivals over `duration_s` simulated seconds; lengths exponential around each mix
    entry's mean (heavy enough tails), at least 1 token. With `conversations`, most chat
    requests are the next turn of an active conversation: its last prompt and answer, then a
    new question (the prefix a worker's cache may hold)."""
    t, index = 0.0, 0
    shares = [m[0] for m in MIX]
    history: dict[int, int] = {}  # conversation -> tokens so far (prompt + answer)
    active: list[int] = []
    while True:
        t += rng.expovariate(rate_per_s)
        if t > duration_s:
            return
        entry = rng.choices(MIX, shares)[0]
        _share, prompt, output = entry
        new = max(1, min(int(rng.expovariate(1 / prompt)), MAX_PROMPT))
        out = max(1, min(int(rng.expovariate(1 / output)), 2_048))
        if not conversations or entry is not MIX[0]:
            yield SimRequest(index, t, new, out)
        else:
            window = max(10, int(rate_per_s * ACTIVE_S * MIX[0][0] * (1 - CONTINUE)))
            if active and rng.random() < CONTINUE:
                conversation = rng.choice(active[-window:])
                shared = history[conversation]
            else:
                conversation, shared = index, 0
                active.append(conversation)
            question = max(1, int(rng.expovariate(1 / 60)))
            total = shared + question
            if total > MAX_PROMPT:  # too long: this conversation starts over
                shared, total = 0, question
            history[conversation] = total + out
            yield SimRequest(index, t, total, out, conversation, shared)
        index += 1


def mean_job_tokens() -> tuple[float, float]:
    """Mean (prompt, output) tokens of the mix (before capping)."""
    shares = sum(m[0] for m in MIX)
    return (
        sum(m[0] * m[1] for m in MIX) / shares,
        sum(m[0] * m[2] for m in MIX) / shares,
    )
