"""Each worker's reputation, probation and quarantine, fed by what settlement and the relay
observe; proven fraud is punished in the books (store.trust_store.punish_fraud).

Evidence is kept in memory for routing (no database read on the request path) and written
behind through the ledger writer; at start-up the recent evidence and the quarantine list are
read back, so a restart neither forgives nor forgets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import (
    Callable,
    Container,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any

from coordinator.services.reputation import Outcome, Standing, Tally, TrustPolicy
from coordinator.store import trust_store
from coordinator.store.db import Engine
from coordinator.store.trust_store import FraudOutcome
from coordinator.store.writer import LedgerWriter

log = logging.getLogger("agora.coordinator.trust")
# a collapsed score quarantines only on enough bad evidence: one rejected receipt or one
# over-claim (see reputation.WEIGHTS), not a few failures of an unlucky new worker
_MIN_BAD_TO_QUARANTINE = 8.0
# only these can quarantine by score: failures and slowness lower it (routing) but are not
# cheating, and the circuit breaker already rests a failing worker
_CHEATING = frozenset({Outcome.RECEIPT_REJECTED, Outcome.OVERCLAIMED, Outcome.CACHE_HIDDEN})


@dataclass(frozen=True)
class Verdict:
    """What settling one job said about its worker."""

    node_id: str
    outcome: Outcome
    request_id: str
    detail: str = ""


class Trust:
    def __init__(
        self,
        engine: Engine,
        writer: LedgerWriter,
        policy: TrustPolicy | None = None,
        slash_amount: int = 0,
        quarantine_below: float = 0.2,
        clock: Callable[[], float] = time.time,
        # other coordinators' weighted evidence about a worker (None outside a p2p market)
        peer_evidence: Callable[[str], tuple[float, float] | None] = lambda _node: None,
    ) -> None:
        self._engine = engine
        self._writer = writer
        self.policy = policy or TrustPolicy()
        self._slash_amount = slash_amount
        self._quarantine_below = quarantine_below
        self._clock = clock
        self._tallies: dict[str, Tally] = {}
        self._quarantined: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._peer_evidence = peer_evidence

    def load(self) -> None:
        """Read the quarantine list and the recent evidence back (at start-up)."""
        since = self._clock() - 4 * self.policy.half_life_s  # older evidence weighs < 1/16
        self._quarantined, recent = trust_store.load(self._engine, since)
        for node, outcome, at in recent:
            tally = self._tallies.get(node, Tally(at=at))
            self._tallies[node] = tally.add(Outcome(outcome), at, self.policy)

    # ------------------------------------------------------------------ reading
    def standing(self, node_id: str) -> Standing:
        """Our own evidence, plus other coordinators' (weighted by their standing) when this
        coordinator is part of a p2p market."""
        now = self._clock()
        tally = self._tallies.get(node_id, Tally(at=now))
        peers = self._peer_evidence(node_id)
        if peers is None:
            return tally.standing(now, self.policy)
        good, bad = peers
        own = tally.decayed(now, self.policy)
        return Tally(own.good + good, own.bad + bad, own.at).standing(now, self.policy)

    def local_standing(self, node_id: str) -> Standing:
        now = self._clock()
        return self._tallies.get(node_id, Tally(at=now)).standing(now, self.policy)

    def local_evidence(self) -> dict[str, tuple[float, float]]:
        """Decayed (good, bad) of every worker from this coordinator's own evidence only (what
        it attests to others)."""
        now = self._clock()
        decayed = {n: t.decayed(now, self.policy) for n, t in self._tallies.items()}
        return {n: (d.good, d.bad) for n, d in decayed.items()}

    def score(self, node_id: str) -> float:
        return self.standing(node_id).score

    @property
    def scores(self) -> Mapping[str, float]:
        """Every worker's score, computed when asked (routing reads only its candidates)."""
        return _Scores(self)

    def on_probation(self, node_id: str) -> bool:
        return self.standing(node_id).probation

    @property
    def probation(self) -> Container[str]:
        """`node in trust.probation`: is it still on probation (computed when asked)."""
        return _Probation(self)

    def quarantined(self, node_id: str) -> str | None:
        """Why the market no longer routes to this worker, or None."""
        return self._quarantined.get(node_id)

    def evidence(self, node_id: str | None, outcome: str | None, limit: int) -> dict[str, Any]:
        """Recorded evidence, newest first, and counts per outcome (reads the database)."""
        outcomes = [outcome] if outcome else []
        return trust_store.evidence(self._engine, node_id, outcomes, limit)

    def recent(
        self, node_id: str | None, outcomes: Sequence[str], limit: int
    ) -> list[dict[str, Any]]:
        """Recorded evidence only, newest first (one query; no counts over the whole table)."""
        return trust_store.latest_events(self._engine, node_id, outcomes, limit)

    def history(self, node_id: str, events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The score after each piece of `events` (newest first, as `evidence` gives them),
        replayed oldest first: a provider's reputation over time."""
        tally, points = None, []
        for event in sorted(events, key=lambda e: float(e["at"])):
            at = float(event["at"])
            tally = (tally or Tally(at=at)).add(Outcome(event["outcome"]), at, self.policy)
            score = tally.standing(at, self.policy).score
            points.append({"at": at, "score": round(score, 4), "outcome": event["outcome"]})
        return points

    # ------------------------------------------------------------------ writing
    def observe(self, verdicts: Iterable[Verdict]) -> None:
        """Take evidence in now (routing sees it at once); persist it without waiting."""
        rows = []
        verdicts = list(verdicts)
        now = self._clock()
        for v in verdicts:
            tally = self._tallies.get(v.node_id, Tally(at=now))
            self._tallies[v.node_id] = tally.add(v.outcome, now, self.policy)
            rows.append({"node_id": v.node_id, "outcome": v.outcome.value,
                         "request_id": v.request_id, "detail": v.detail[:500]})  # fmt: skip
        if not rows:
            return
        self._spawn(trust_store.save_events(self._writer, rows))
        for v in verdicts:
            if v.outcome is Outcome.FRAUD:
                self._spawn(self.punish(v.node_id, v.request_id, v.detail))
            elif v.outcome in _CHEATING and v.node_id not in self._quarantined:
                record = self.local_standing(v.node_id)  # quarantine: our own evidence only
                if record.score < self._quarantine_below and record.bad >= _MIN_BAD_TO_QUARANTINE:
                    reason = f"reputation {record.score:.2f} after {v.outcome.value}"
                    self._spawn(self.punish(v.node_id, v.request_id, reason, proven=False))

    async def punish(
        self, node_id: str, request_id: str, reason: str, *, proven: bool = True
    ) -> FraudOutcome:
        """Quarantine the worker; for proven fraud also refund, claw back and slash."""
        self._quarantined[node_id] = reason
        slash = self._slash_amount if proven else 0
        outcome = await trust_store.punish(
            self._writer, node_id, request_id, reason, slash, proven=proven
        )
        log.warning(
            "worker %s quarantined (%s): refunded %s, clawed back %d, slashed %d",
            node_id, reason, outcome.refunded, outcome.clawed_back, outcome.slashed,
        )  # fmt: skip
        return outcome

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Scores(Mapping[str, float]):
    def __init__(self, trust: Trust) -> None:
        self._trust = trust

    def __getitem__(self, node_id: str) -> float:
        return self._trust.score(node_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._trust._tallies)

    def __len__(self) -> int:
        return len(self._trust._tallies)


class _Probation(Container[str]):
    def __init__(self, trust: Trust) -> None:
        self._trust = trust

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self._trust.on_probation(node_id)
