"""Routing: a pure, explainable function from (request, candidates, stats, preferences) to a
ranked list of workers.

No I/O: inputs are plain values read through small protocols, randomness comes from the rng the
caller passes, and the output carries every score term so each response can say why it went
where it went. It scales by sampling: a request looks at `sample_size` random eligible
candidates (power-of-k choices), never at all 10k workers, except where the client asked for
something that needs an order over all of them (sort by price: the pool is kept sorted).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Sort = Literal["price", "latency", "throughput"]
_MAX_WALK = 1024  # candidates looked at, at most, to find an established worker


class CandidateView(Protocol):
    """One worker's offer of one model, as routing sees it (live values)."""

    @property
    def node_id(self) -> str: ...
    @property
    def price_prompt_per_mtok(self) -> int: ...  # client price (fee included)
    @property
    def price_completion_per_mtok(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def engine_waiting(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...
    @property
    def available(self) -> bool: ...
    @property
    def adapters(self) -> Collection[str]: ...  # LoRA adapters (sha256) loaded now
    @property
    def max_loras(self) -> int: ...  # adapters it can hold loaded (0: it loads none)
    @property
    def adapter_price_prompt_per_mtok(self) -> int: ...  # client price with an adapter
    @property
    def adapter_price_completion_per_mtok(self) -> int: ...
    @property
    def price_cached_prompt_per_mtok(self) -> int: ...  # client price of a cached prompt token
    @property
    def task(self) -> str: ...  # "generate" or "embed" (protocol.advert)
    @property
    def takes_batches(self) -> bool: ...  # it signs batch prices (Batch API jobs)
    @property
    def data_retention(self) -> str: ...  # declared in its signed advert ("" = undeclared)
    @property
    def region(self) -> str: ...  # declared in its signed advert ("" = undeclared)


class StatsView(Protocol):
    """What the coordinator measured about a worker serving a model."""

    @property
    def ttft_s(self) -> float | None: ...
    @property
    def itl_s(self) -> float | None: ...
    @property
    def cooldown_until(self) -> float: ...

    def failure_rate(self) -> float: ...


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prompt_tokens: int  # upper bound
    max_tokens: int  # upper bound of completion tokens
    adapter: str = ""  # sha256 of the LoRA adapter it runs with ("" = the base model)
    task: str = "generate"  # what it needs of the model: "generate" or "embed"
    batch: bool = False  # a Batch API line: only workers that sign batch prices
    reserve: tuple[int, int] = (0, 0)  # the operator's lowest (prompt, completion) client price


@dataclass(frozen=True)
class Preferences:
    """The client's `provider` object (OpenRouter-style)."""

    sort: Sort | None = None
    max_price_prompt: int | None = None  # micro-units per 1M tokens, client price
    max_price_completion: int | None = None
    order: tuple[str, ...] = ()  # node ids (or their last characters) to try first
    ignore: frozenset[str] = frozenset()  # node ids (or their last characters) never to use
    allow_fallbacks: bool = True  # if False, only `order` (or the single best) is tried
    # the client's policy (services.policy): what a worker must declare, how trusted it is
    data_retention: frozenset[str] = frozenset()  # accepted declarations (empty: any)
    regions: frozenset[str] = frozenset()  # accepted regions (empty: any)
    min_reputation: float | None = None


@dataclass(frozen=True)
class RoutingPolicy:
    sample_size: int = 8  # candidates scored per request; the rest are not looked at
    ranked_size: int = 3  # how many ranked candidates a decision keeps (failover order)
    price_weight: float = 1.0  # cost relative to the cheapest scored candidate, minus 1
    latency_weight: float = 2.0  # expected time to first token, seconds
    load_weight: float = 1.0  # slots in use (0..1) + engine queue per slot + KV usage / 2
    failure_weight: float = 2.0  # Bayesian failure rate of recent attempts
    reputation_weight: float = 1.0  # 1 - reputation (0..1)
    default_ttft_s: float = 0.5  # TTFT assumed for a worker never measured
    default_itl_s: float = 0.05  # inter-token latency assumed for a worker never measured
    # a request with a LoRA adapter: workers holding it loaded are looked at first, and one
    # that would have to load it pays `cold_load_s` of expected time to first token, twice
    # when its slots are full (off: the workers that can run it, in random order: the
    # baseline affinity is measured against)
    adapter_affinity: bool = True
    cold_load_s: float = 1.0
    # prefix-aware routing: a worker that was recently sent a share s of this prompt (its
    # engine likely holds that KV cache) scores `cache_weight * s` better, unless its slots
    # are `cache_balance_load` full or more: then a hot prefix spreads instead of piling up
    # (the bonus is bounded: a worker measured slow is not made fast by holding a prefix)
    cache_weight: float = 2.0
    cache_balance_load: float = 0.75


@dataclass(frozen=True)
class Scored:
    node_id: str
    score: float  # lower is better
    terms: dict[str, float]


@dataclass(frozen=True)
class Decision:
    ranked: tuple[Scored, ...]
    considered: int  # candidates offering the model
    sampled: int  # candidates actually scored
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> count
    sort: str = "default"
    at_capacity: tuple[str, ...] = ()  # sampled workers that had no free slot (missed jobs)

    def explain(self) -> str:
        """Compact form for the X-Agora-Route header."""
        chosen = ";".join(
            f"{s.node_id[-8:]}:{s.score:.3f}("
            + ",".join(f"{k}={v:.3g}" for k, v in s.terms.items())
            + ")"
            for s in self.ranked
        )
        skipped = ",".join(f"{k}={v}" for k, v in sorted(self.excluded.items()))
        return (
            f"sort={self.sort};considered={self.considered};sampled={self.sampled};"
            f"excluded={skipped or 0};ranked={chosen}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "sort": self.sort,
            "considered": self.considered,
            "sampled": self.sampled,
            "excluded": dict(self.excluded),
            "ranked": [
                {"node_id": s.node_id, "score": s.score, "terms": dict(s.terms)}
                for s in self.ranked
            ],
        }


def _matches(node_id: str, names: Sequence[str] | frozenset[str]) -> bool:
    return any(node_id == n or (len(n) >= 6 and node_id.endswith(n)) for n in names)


def _prices(request: RouteRequest, c: CandidateView) -> tuple[int, int]:
    """The client's (prompt, completion) price per 1M tokens for this request on `c`."""
    if request.adapter:
        return c.adapter_price_prompt_per_mtok, c.adapter_price_completion_per_mtok
    return c.price_prompt_per_mtok, c.price_completion_per_mtok


def _cost(request: RouteRequest, c: CandidateView, cached: float = 0.0) -> float:
    """The request's expected price on `c`: the share of the prompt its engine likely holds
    at its cached price (never above the prompt price), the rest at the prompt price."""
    prompt, completion = _prices(request, c)
    cached_price = min(c.price_cached_prompt_per_mtok, prompt)
    per_prompt_token = prompt - cached * (prompt - cached_price)
    return request.prompt_tokens * per_prompt_token + request.max_tokens * completion


def priced_out(request: RouteRequest, c: CandidateView, prefs: Preferences) -> str | None:
    """Why `c`'s price rules it out for this request: under the operator's reserve, or over
    the client's max_price (None: it does not)."""
    prompt, completion = _prices(request, c)
    if prompt < request.reserve[0] or completion < request.reserve[1]:
        return "below_reserve"
    if prefs.max_price_prompt is not None and prompt > prefs.max_price_prompt:
        return "over_max_price"
    if prefs.max_price_completion is not None and completion > prefs.max_price_completion:
        return "over_max_price"
    return None


def _exclusion(
    request: RouteRequest, c: CandidateView, prefs: Preferences, stats: StatsView | None,
    now: float, reputation: Mapping[str, float],
) -> str | None:  # fmt: skip
    if not c.available:
        return "unavailable"
    if c.task != request.task:  # an embedding model under a chat model's name, or back
        return "wrong_task"
    if request.batch and not c.takes_batches:
        return "no_batch_price"
    if request.adapter and request.adapter not in c.adapters and c.max_loras < 1:
        return "no_adapter"
    if c.in_flight >= c.max_concurrency:
        return "at_capacity"
    if prefs.ignore and _matches(c.node_id, prefs.ignore):
        return "ignored"
    if prefs.data_retention and c.data_retention not in prefs.data_retention:
        return "policy_retention"
    if prefs.regions and c.region not in prefs.regions:
        return "policy_region"
    if prefs.min_reputation is not None and reputation.get(c.node_id, 0.5) < prefs.min_reputation:
        return "policy_reputation"
    if (why := priced_out(request, c, prefs)) is not None:
        return why
    if stats is not None and stats.cooldown_until > now:
        return "cooling_down"
    return None


def _cold_load(adapter: str, c: CandidateView, policy: RoutingPolicy) -> float:
    """Expected seconds before the adapter can run on `c`: none when loaded; a load; and a
    second one's worth when every slot is taken (the adapter it evicts is loaded again for
    someone else later): so new adapters spread over workers with room."""
    if adapter in c.adapters:
        return 0.0
    full = len(c.adapters) >= c.max_loras
    return policy.cold_load_s * (2.0 if full else 1.0)


def _score(
    request: RouteRequest,
    c: CandidateView,
    stats: StatsView | None,
    reputation: float,
    cheapest: float,
    policy: RoutingPolicy,
    sort: Sort | None,
    cached: float = 0.0,
) -> Scored:
    ttft = (stats.ttft_s if stats else None) or policy.default_ttft_s
    itl = (stats.itl_s if stats else None) or policy.default_itl_s
    cost = _cost(request, c, cached)
    price = cost / cheapest - 1.0 if cheapest else (1.0 if cost else 0.0)
    slots = max(1, c.max_concurrency)
    load = c.in_flight / slots + c.engine_waiting / slots + c.kv_cache_usage / 2
    failure = stats.failure_rate() if stats else 0.0
    bonus = 0.0
    terms = {
        "price": price,
        "ttft": ttft,
        "load": load,
        "fail": failure,
        "rep": reputation,
    }
    if cached:  # the share of the prompt its engine likely holds, while it has room; it does
        terms["cache"] = cached  # not scale the measured TTFT: a slow worker stays slow
        if c.in_flight / slots < policy.cache_balance_load:
            bonus = policy.cache_weight * cached
    if request.adapter:  # the adapter loaded (0) or to load first (its assumed cost) …
        terms["cold"] = _cold_load(request.adapter, c, policy)
        if policy.adapter_affinity:
            ttft += terms["cold"]
    if sort == "price":
        score = cost / 1e6 + 1e-6 * (ttft + load)  # cheapest first; ties by speed and load
    elif sort == "latency":
        score = ttft + itl * min(request.max_tokens, 256) + 0.1 * load
    elif sort == "throughput":
        score = itl + 0.01 * load
        terms["itl"] = itl
    else:
        score = (
            policy.price_weight * price
            + policy.latency_weight * ttft
            + policy.load_weight * load
            + policy.failure_weight * failure
            + policy.reputation_weight * (1.0 - reputation)
            - bonus
        )
    return Scored(c.node_id, score, terms)


def _find_established(
    pool: Sequence[CandidateView],
    probation: Container[str],
    picked: list[CandidateView],
    consider: Callable[[int], None],
    rng: random.Random,
) -> None:
    """When probation workers are over their share and the sample holds none but them, walk
    the pool from a random point until an eligible established worker is found (at most
    _MAX_WALK steps: the caller stops asking for a while when a walk finds nobody)."""
    if any(c.node_id not in probation for c in picked):
        return
    n, start = len(pool), rng.randrange(len(pool))
    for step in range(min(n, _MAX_WALK)):
        index = (start + step) % n
        if pool[index].node_id not in probation:
            before = len(picked)
            consider(index)
            if len(picked) > before:  # eligible: it was added
                return


def route(
    request: RouteRequest,
    pool: Sequence[CandidateView],
    stats: Mapping[str, StatsView],
    prefs: Preferences,
    rng: random.Random,
    now: float,
    policy: RoutingPolicy = RoutingPolicy(),
    reputation: Mapping[str, float] | None = None,
    price_sorted: bool = False,
    probation: Container[str] = frozenset(),
    probation_over_budget: bool = False,
    cached: Mapping[int, float] | None = None,
    holders: Sequence[int] = (),
) -> Decision:
    """Rank workers for one request. `pool` holds every candidate offering the model; when
    `price_sorted` it is ordered by completion price, cheapest first. When the workers on
    `probation` have taken their share of traffic, they rank after established ones (unless
    the client named them). `cached`: per worker (its index in `pool`), the share of this
    prompt it was recently sent (services.prefixes), for prefix-aware routing. `holders`: the
    places in `pool` of the workers holding the request's LoRA adapter loaded."""
    excluded: dict[str, int] = {}
    picked: list[CandidateView] = []
    seen: set[int] = set()
    full: list[str] = []
    cooling: list[CandidateView] = []  # eligible but for a recent failure

    def consider(index: int) -> None:
        if index in seen:
            return
        seen.add(index)
        c = pool[index]
        why = _exclusion(request, c, prefs, stats.get(c.node_id), now, reputation or {})
        if why:
            excluded[why] = excluded.get(why, 0) + 1
            if why == "at_capacity":
                full.append(c.node_id)
            elif why == "cooling_down":
                cooling.append(c)
        else:
            picked.append(c)

    first: list[CandidateView] = []
    if prefs.order:  # the client's own order comes first, each if eligible
        for name in prefs.order:
            for i, c in enumerate(pool):
                if i not in seen and _matches(c.node_id, (name,)):
                    consider(i)
        first, picked = picked, []
    if prefs.allow_fallbacks or not prefs.order:
        n = len(pool)
        if cached:  # those recently sent this prompt's prefix first, the longest first
            for index in sorted(cached, key=lambda i: -cached[i])[: policy.sample_size]:
                consider(index)
        if request.adapter and policy.adapter_affinity:  # those holding it loaded first
            for i in holders:
                if len(picked) >= policy.sample_size:
                    break
                consider(i)
        # the pool is sorted by base price: a request with an adapter (its own prices) samples
        by_price = price_sorted and not request.adapter
        if (prefs.sort == "price" or prefs.max_price_completion is not None) and by_price:
            for i in range(n):  # cheapest first: stop once enough eligible ones are found
                if len(picked) >= policy.sample_size:
                    break
                if (
                    prefs.max_price_completion is not None
                    and pool[i].price_completion_per_mtok > prefs.max_price_completion
                ):
                    excluded["over_max_price"] = excluded.get("over_max_price", 0) + n - i
                    break
                consider(i)
        elif n <= policy.sample_size * 2:
            for i in range(n):
                consider(i)
        else:  # power-of-k choices: a few random draws, more if they were not eligible
            tries = 0
            while len(picked) < policy.sample_size and tries < policy.sample_size * 4:
                consider(rng.randrange(n))
                tries += 1
            if probation_over_budget:
                _find_established(pool, probation, picked, consider, rng)
    if not first and not picked and cooling:
        # the breaker protects traffic that can go elsewhere; it never turns a model off:
        # with nobody else able to serve, the cooling workers are tried (ranked as usual)
        picked = cooling
    reputation = reputation or {}
    shares = {pool[i].node_id: share for i, share in cached.items()} if cached else {}
    everyone = first + picked
    cheapest = min((_cost(request, c, shares.get(c.node_id, 0.0)) for c in everyone), default=0.0)

    def scored(cands: list[CandidateView]) -> list[Scored]:
        out = [
            _score(
                request,
                c,
                stats.get(c.node_id),
                reputation.get(c.node_id, 0.5),
                cheapest,
                policy,
                prefs.sort,
                shares.get(c.node_id, 0.0),
            )
            for c in cands
        ]
        out.sort(key=lambda s: (s.score, s.node_id))
        return out

    rest = scored(picked)
    if request.adapter and not policy.adapter_affinity:
        rng.shuffle(rest)  # the baseline affinity is measured against: random routing
    if probation_over_budget:
        new = [s for s in rest if s.node_id in probation]
        if len(new) < len(rest):  # someone established can serve: they go first
            marked = [Scored(s.node_id, s.score, {**s.terms, "probation": 1.0}) for s in new]
            rest = [s for s in rest if s.node_id not in probation] + marked
    ranked = scored(first) + rest
    if not prefs.allow_fallbacks:
        ranked = ranked[:1]
    return Decision(
        ranked=tuple(ranked[: policy.ranked_size]),
        considered=len(pool),
        sampled=len(seen),
        excluded=excluded,
        sort=prefs.sort or "default",
        at_capacity=tuple(full),
    )
