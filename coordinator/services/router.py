"""Routing with its bookkeeping around the pure `routing.route`: live pool, measured stats,
reputation and the probation share go in; the scores and the jobs each full worker missed are
written back for the dashboard and the metrics."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping

from coordinator.services.prefixes import Chain, PrefixIndex
from coordinator.services.probation import ProbationShare
from coordinator.services.registry import Registry
from coordinator.services.routing import (
    CandidateView,
    Decision,
    Preferences,
    RouteRequest,
    RoutingPolicy,
    priced_out,
    route,
)
from coordinator.services.stats import StatsBook
from coordinator.services.trust import Trust

SESSION_SHARE = 1.0  # a session says the conversation goes on: its last worker counts as holding it


class Router:
    def __init__(
        self, registry: Registry, stats: StatsBook, trust: Trust | None, policy: RoutingPolicy,
        rng: random.Random, prefixes: PrefixIndex | None = None,
        reserves: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:  # fmt: skip
        self._prefixes = prefixes  # None: prefix-aware routing is off
        self._reserves = reserves or {}  # model -> the operator's reserve, as clients pay it
        self._registry = registry
        self._stats = stats
        self._trust = trust
        self._policy = policy
        self._rng = rng
        self.probation_share = ProbationShare(trust.policy.probation_share if trust else 1.0)

    @property
    def prefix_aware(self) -> bool:
        return self._prefixes is not None

    def decide(
        self, bound: RouteRequest, prefs: Preferences, excluded: set[str], chain: Chain = (),
        session: str = "",
    ) -> Decision:  # fmt: skip
        if excluded:
            prefs = dataclasses.replace(prefs, ignore=prefs.ignore | frozenset(excluded))
        trust, model = self._trust, bound.model
        bound = self._reserved(bound)
        capped = self.probation_share.over_budget(model)
        cached = self._cached(_cache_key(bound), model, chain, session)
        decision = route(
            bound, self._registry.pool(model), self._stats.for_model(model), prefs, self._rng,
            time.monotonic(), self._policy,
            reputation=trust.scores if trust else None, price_sorted=True,
            probation=trust.probation if trust else frozenset(), probation_over_budget=capped,
            cached=cached,
            holders=self._registry.adapter_holders(model, bound.adapter) if bound.adapter else (),
        )  # fmt: skip
        if decision.ranked and trust is not None:
            to_new = trust.on_probation(decision.ranked[0].node_id)
            self.probation_share.record(model, to_new, capped)
        for scored in decision.ranked:
            self._stats.get(scored.node_id, model).last_score = scored.score
        for node_id in decision.at_capacity:
            self._stats.get(node_id, model).missed_for_capacity += 1
        return decision

    def _reserved(self, bound: RouteRequest) -> RouteRequest:
        reserve = self._reserves.get(bound.model)
        return dataclasses.replace(bound, reserve=reserve) if reserve else bound

    def priced_out(self, bound: RouteRequest, slot: CandidateView, prefs: Preferences) -> bool:
        """The worker's price (as it advertises now) no longer fits the request."""
        return priced_out(self._reserved(bound), slot, prefs) is not None

    def _cached(self, key: str, model: str, chain: Chain, session: str) -> dict[int, float] | None:
        """Per worker (its place in the model's pool), the share of this prompt it likely
        holds: a lookup per holder, never a walk over the pool."""
        if self._prefixes is None or not (chain or session):
            return None
        now = time.monotonic()
        shares = self._prefixes.shares(key, chain, now)
        holder = self._prefixes.session_holder(key, session, now) if session else None
        if holder is not None:
            shares[holder] = max(shares.get(holder, 0.0), SESSION_SHARE)
        places = self._registry.places(model)
        return {places[node]: share for node, share in shares.items() if node in places}

    def served(self, bound: RouteRequest, chain: Chain, node_id: str, session: str = "") -> None:
        """A job with this prompt went to `node_id`: its engine caches the prefix now."""
        if self._prefixes is not None and (chain or session):
            self._prefixes.record(_cache_key(bound), chain, node_id, time.monotonic(), session)


def _cache_key(bound: RouteRequest) -> str:
    """An engine keeps a prefix cache per base model and per LoRA adapter."""
    return f"{bound.model}+{bound.adapter}" if bound.adapter else bound.model
