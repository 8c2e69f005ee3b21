"""Routing policies compared on the same workload. `agora` is the coordinator's own code:
`coordinator.services.routing.route` with the real latency/failure stats
(coordinator.services.stats), reputation (coordinator.services.reputation) and probation share
(coordinator.services.probation); the others are the usual baselines."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from coordinator.services.prefixes import PrefixIndex
from coordinator.services.probation import ProbationShare
from coordinator.services.reputation import Outcome, Standing, Tally, TrustPolicy
from coordinator.services.routing import Preferences, RouteRequest, RoutingPolicy, route
from coordinator.services.stats import WorkerStats
from simulations.fleet import SimWorker
from simulations.workload import SimRequest

FAILOVER = 3  # workers a request may try


class Policy(Protocol):
    name: str
    checks: bool

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]: ...

    def started(self, worker: SimWorker) -> None: ...

    def serving(self, request: SimRequest, worker: SimWorker, now: float) -> None: ...

    def finished(
        self, worker: SimWorker, ok: bool, ttft: float, itl: float, now: float
    ) -> None: ...

    def verdict(self, worker: SimWorker, genuine: bool, now: float) -> None: ...


class _Base(Policy):
    name = "base"
    checks = False  # whether it spot-checks output (only Agora does)

    def __init__(self, fleet: list[SimWorker], rng: random.Random) -> None:
        self.fleet = fleet
        self.rng = rng

    def _random_free(self, tries: int = 32) -> Iterator[SimWorker]:
        for _ in range(tries):
            worker = self.fleet[self.rng.randrange(len(self.fleet))]
            if worker.free:
                yield worker

    def _first(self, found: Iterator[SimWorker]) -> list[SimWorker]:
        out: list[SimWorker] = []
        for worker in found:
            if worker not in out:
                out.append(worker)
            if len(out) == FAILOVER:
                break
        return out

    def started(self, worker: SimWorker) -> None:
        pass

    def finished(self, worker: SimWorker, ok: bool, ttft: float, itl: float, now: float) -> None:
        pass

    def serving(self, request: SimRequest, worker: SimWorker, now: float) -> None:
        pass

    def verdict(self, worker: SimWorker, genuine: bool, now: float) -> None:
        pass


class RandomPolicy(_Base):
    name = "random"

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]:
        return self._first(self._random_free())


class RoundRobin(_Base):
    name = "round-robin"

    def __init__(self, fleet: list[SimWorker], rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self._next = itertools.cycle(range(len(fleet)))

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]:
        candidates = (self.fleet[next(self._next)] for _ in range(256))
        return self._first(w for w in candidates if w.free)


class LeastLoaded(_Base):
    """Full information: always the worker with the smallest share of its slots in use."""

    name = "least-loaded"

    def __init__(self, fleet: list[SimWorker], rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self._index = {w.node_id: i for i, w in enumerate(fleet)}
        self._by_load = SortedList((0.0, i) for i in range(len(fleet)))

    def _key(self, worker: SimWorker) -> tuple[float, int]:
        return (worker.in_flight / worker.gpu.slots, self._index[worker.node_id])

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]:
        return self._first(w for _, i in self._by_load.islice(0, 16) if (w := self.fleet[i]).free)

    def started(self, worker: SimWorker) -> None:
        self._by_load.remove(
            ((worker.in_flight - 1) / worker.gpu.slots, self._index[worker.node_id])
        )
        self._by_load.add(self._key(worker))

    def finished(self, worker: SimWorker, ok: bool, ttft: float, itl: float, now: float) -> None:
        self._by_load.remove(
            ((worker.in_flight + 1) / worker.gpu.slots, self._index[worker.node_id])
        )
        self._by_load.add(self._key(worker))


class PowerOfTwo(_Base):
    name = "power-of-two"

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]:
        found = list(itertools.islice(self._random_free(), 4))
        found.sort(key=lambda w: w.in_flight / w.gpu.slots)
        return self._first(iter(found[:2] + found[2:]))


class StakeWeighted(_Base):
    """Livepeer-style: 70% of picks weighted by stake, 30% uniformly at random."""

    name = "stake-weighted"

    def __init__(self, fleet: list[SimWorker], rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self._cumulative = list(itertools.accumulate(w.stake for w in fleet))

    def _pick(self) -> Iterator[SimWorker]:
        for _ in range(32):
            if self.rng.random() < 0.7:
                point = self.rng.random() * self._cumulative[-1]
                worker = self.fleet[bisect.bisect_left(self._cumulative, point)]
            else:
                worker = self.fleet[self.rng.randrange(len(self.fleet))]
            if worker.free:
                yield worker

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]:
        return self._first(self._pick())


class _Reputation(Mapping[str, float]):
    def __init__(self, agora: Agora) -> None:
        self._agora = agora

    def __getitem__(self, node_id: str) -> float:
        return self._agora.standing(node_id).score

    def __iter__(self) -> Iterator[str]:
        return iter(self._agora.tallies)

    def __len__(self) -> int:
        return len(self._agora.tallies)


class _Probation:
    def __init__(self, agora: Agora) -> None:
        self._agora = agora

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self._agora.standing(node_id).probation


class Agora(_Base):
    """The coordinator's routing, stats, reputation and probation share, unchanged."""

    name = "agora"
    checks = True
    prefix_aware = True  # the cache term (services.prefixes): a turn goes where its prefix is

    def __init__(self, fleet: list[SimWorker], rng: random.Random) -> None:
        super().__init__(fleet, rng)
        self.prefixes = PrefixIndex(ttl_s=600.0)  # a conversation's last worker (sessions)
        self.stats: dict[str, WorkerStats] = {}
        self.tallies: dict[str, Tally] = {}
        self.trust = TrustPolicy()
        self.routing = RoutingPolicy()
        self.share = ProbationShare(self.trust.probation_share)
        self._by_id = {w.node_id: w for w in fleet}
        self._places = {w.node_id: i for i, w in enumerate(fleet)}  # the pool's order
        self._reputation = _Reputation(self)
        self._probation = _Probation(self)
        self.now = 0.0

    def standing(self, node_id: str) -> Standing:
        tally = self.tallies.get(node_id, Tally(at=self.now))
        return tally.standing(self.now, self.trust)

    def _stats(self, node_id: str) -> WorkerStats:
        stats = self.stats.get(node_id)
        if stats is None:
            stats = self.stats[node_id] = WorkerStats()
        return stats

    def rank(self, request: SimRequest, now: float) -> list[SimWorker]:
        self.now = now
        bound = RouteRequest("m", request.prompt_tokens, request.output_tokens)
        capped = self.share.over_budget("m")
        decision = route(
            bound, self.fleet, self.stats, Preferences(), self.rng, now, self.routing,
            reputation=self._reputation, price_sorted=True, probation=self._probation,
            probation_over_budget=capped, cached=self._cached(request, now),
        )  # fmt: skip
        ranked = [self._by_id[s.node_id] for s in decision.ranked]
        if ranked:
            self.share.record("m", ranked[0].node_id in self._probation, capped)
        return ranked

    def _cached(self, request: SimRequest, now: float) -> dict[int, float] | None:
        """The share of this turn the conversation's last worker holds (none if unknown)."""
        if not self.prefix_aware or request.conversation < 0 or not request.shared_tokens:
            return None
        holder = self.prefixes.session_holder("m", str(request.conversation), now)
        if holder is None:
            return None
        return {self._places[holder]: request.shared_tokens / request.prompt_tokens}

    def serving(self, request: SimRequest, worker: SimWorker, now: float) -> None:
        if self.prefix_aware and request.conversation >= 0:
            self.prefixes.record("m", (), worker.node_id, now, session=str(request.conversation))

    def _observe(self, worker: SimWorker, outcome: Outcome, now: float) -> None:
        tally = self.tallies.get(worker.node_id, Tally(at=now))
        self.tallies[worker.node_id] = tally.add(outcome, now, self.trust)

    def finished(self, worker: SimWorker, ok: bool, ttft: float, itl: float, now: float) -> None:
        stats = self._stats(worker.node_id)
        if ok:
            stats.record_latency(ttft, itl)
            stats.record_success(now)
            self._observe(worker, Outcome.SERVED, now)
        else:
            stats.record_failure(now)
            self._observe(worker, Outcome.FAILED, now)

    def verdict(self, worker: SimWorker, genuine: bool, now: float) -> None:
        """A spot check's result: fraud quarantines (as services.trust does)."""
        self._observe(worker, Outcome.VERIFIED if genuine else Outcome.FRAUD, now)
        if not genuine:
            worker.quarantined = True


class AgoraWithoutCache(Agora):
    """Agora's routing without the prefix cache term (the baseline it is measured against)."""

    name = "agora-no-cache"
    prefix_aware = False


PolicyFactory = Callable[[list[SimWorker], random.Random], Policy]
POLICIES: dict[str, PolicyFactory] = {
    p.name: p
    for p in (
        RandomPolicy,
        RoundRobin,
        LeastLoaded,
        PowerOfTwo,
        StakeWeighted,
        Agora,
        AgoraWithoutCache,
    )
}
DEFAULT_POLICIES = tuple(name for name in POLICIES if name != AgoraWithoutCache.name)
