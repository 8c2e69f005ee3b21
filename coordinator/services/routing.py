"""Routing: a pure, explainable function from (request, candidates) to a ranked list.

No I/O here: inputs are plain values, the output carries the terms of every score so a
response can say why it went where it went.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prompt_tokens: int  # estimate
    max_tokens: int  # upper bound of completion tokens


@dataclass(frozen=True)
class Candidate:
    node_id: str
    price_prompt_per_mtok: int
    price_completion_per_mtok: int
    in_flight: int
    max_concurrency: int


@dataclass(frozen=True)
class Scored:
    node_id: str
    score: float  # lower is better
    terms: dict[str, float]


@dataclass(frozen=True)
class Decision:
    ranked: tuple[Scored, ...]
    considered: int  # candidates that serve the model
    excluded: dict[str, str]  # node id -> why it was not ranked

    def explain(self, limit: int = 3) -> str:
        """Compact form for a response header."""
        head = ";".join(
            f"{s.node_id[-8:]}:{s.score:.3f}("
            + ",".join(f"{k}={v:.3g}" for k, v in s.terms.items())
            + ")"
            for s in self.ranked[:limit]
        )
        return f"considered={self.considered};excluded={len(self.excluded)};{head}"


@dataclass(frozen=True)
class Weights:
    price: float = 1.0  # weight of the expected cost relative to the cheapest candidate
    load: float = 1.0  # weight of the fraction of slots in use


def rank(
    request: RouteRequest, candidates: list[Candidate], weights: Weights = Weights()
) -> Decision:
    excluded: dict[str, str] = {}
    usable: list[tuple[Candidate, int]] = []
    for c in candidates:
        if c.in_flight >= c.max_concurrency:
            excluded[c.node_id] = "at capacity"
            continue
        cost = (
            request.prompt_tokens * c.price_prompt_per_mtok
            + request.max_tokens * c.price_completion_per_mtok
        )
        usable.append((c, cost))
    cheapest = min((cost for _, cost in usable), default=0)
    scored = []
    for c, cost in usable:
        price_term = cost / cheapest - 1.0 if cheapest else (1.0 if cost else 0.0)
        load_term = c.in_flight / c.max_concurrency
        terms = {"price": price_term, "load": load_term}
        score = weights.price * price_term + weights.load * load_term
        scored.append(Scored(c.node_id, score, terms))
    scored.sort(key=lambda s: (s.score, s.node_id))
    return Decision(tuple(scored), len(candidates), excluded)
