"""The node's asks: the offers it advertises now and, for models priced `auto`, the loop that
moves them with demand (the rule: worker_node.pricing).

Each coordinator gets its own advert: an operator's reserve price (on its board) lifts the
node's ask at that coordinator only. Which advert a job was priced at is the session's
business (worker_node.session keeps the adverts it sent)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from protocol.advert import ModelOffer
from protocol.market import DemandBoard
from worker_node.pricing import (
    Decision,
    Interval,
    PriceLadder,
    PriceState,
    decide,
    would_pay,
)

log = logging.getLogger("agora.worker.asks")

DECISIONS = 50  # kept per model for the status file and `agora worker status`
BOARD_WINDOW = "60s"  # the boards' window the rule reads


@dataclasses.dataclass(frozen=True)
class AutoPrice:
    ladder: PriceLadder
    interval_s: float


@dataclasses.dataclass
class _Usage:
    """One model's jobs over the current interval: slot-seconds in use (time-weighted)."""

    clock: Callable[[], float] = time.monotonic
    running: int = 0
    used_s: float = 0.0  # slot-seconds in use since the interval began, up to `at`
    at: float = 0.0  # the last change
    began: float = 0.0

    def __post_init__(self) -> None:
        self.at = self.began = self.clock()

    def change(self, delta: int) -> None:
        now = self.clock()
        self.used_s += self.running * (now - self.at)
        self.running, self.at = self.running + delta, now

    def busy_share(self, slots: int) -> float:
        """Of the interval's slot time so far, the share in use; and a new interval begins."""
        self.change(0)
        span = self.at - self.began
        share = self.used_s / (slots * span) if span > 0 and slots else 0.0
        self.used_s, self.began = 0.0, self.at
        return min(1.0, share)


class Asks:
    def __init__(
        self, auto: dict[str, AutoPrice] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._auto = auto or {}
        self._clock = clock
        self.current: dict[str, ModelOffer] = {}  # at the node's own rung, before any reserve
        self._configured: dict[str, ModelOffer] = {}  # as the operator set them (the floor)
        # coordinator id -> model -> the reserve its board publishes (prompt, completion)
        self._reserves: dict[str, dict[str, tuple[int, int]]] = {}
        # from the start, so an interval's idle time before its first job counts
        self._usage = {model: _Usage(clock) for model in self._auto}
        self._state = {model: PriceState() for model in self._auto}
        self._due = dict.fromkeys(self._auto, 0.0)  # monotonic time of the next evaluation
        self.decisions: dict[str, deque[dict[str, Any]]] = {m: deque(maxlen=DECISIONS)
                                                            for m in self._auto}  # fmt: skip

    @classmethod
    def fixed(cls, offers: dict[str, ModelOffer]) -> Asks:
        asks = cls()
        for offer in offers.values():
            asks.set(offer)
        return asks

    def set(self, offer: ModelOffer) -> None:
        """The model's offer at the floor of its ladder (as configured, with what the engine
        told of itself); an auto-priced model keeps its rung."""
        self._configured[offer.name] = offer
        auto = self._auto.get(offer.name)
        if auto is not None:
            offer = self._priced(offer, auto.ladder.ask(self._state[offer.name].rung))
        self.current[offer.name] = offer

    # ---------------------------------------------------------------- what is advertised
    def offers_for(self, coordinator_id: str) -> dict[str, ModelOffer]:
        """The offers to advertise to one coordinator: an auto-priced model's ask lifted to
        that coordinator's reserve (never above the ceiling)."""
        reserves = self._reserves.get(coordinator_id, {})
        out = dict(self.current)
        for model, auto in self._auto.items():
            if model in out and model in reserves:
                ask = auto.ladder.ask(self._state[model].rung, reserves[model])
                out[model] = self._priced(out[model], ask)
        return out

    @contextlib.contextmanager
    def running(self, model: str) -> Iterator[None]:
        usage = self._usage.setdefault(model, _Usage(self._clock))
        usage.change(+1)
        try:
            yield
        finally:
            usage.change(-1)

    def note(self, model: str) -> str:
        last = self.decisions.get(model)
        return str(last[-1]["reason"]) if last else ""

    # ---------------------------------------------------------------- the auto loop
    @property
    def auto(self) -> bool:
        return bool(self._auto)

    async def follow(
        self, boards: Callable[[], Awaitable[list[DemandBoard]]],
        changed: Callable[[], None], stop: asyncio.Event,
    ) -> None:  # fmt: skip
        """Evaluate each auto-priced model once per its interval until `stop`; `changed` is
        told when an ask moved (the sessions then advertise again)."""
        if not self._auto:
            return
        for model, auto in self._auto.items():
            self._due[model] = time.monotonic() + auto.interval_s
        tick = min(a.interval_s for a in self._auto.values()) / 4
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick)
            due = [m for m, at in self._due.items() if time.monotonic() >= at]
            if not due or stop.is_set():
                continue
            try:
                seen = await boards()
                if not seen:  # no coordinator answered (none connected, or all too old):
                    continue  # nothing to read demand from; the ask holds
                if any([self.evaluate(model, seen) for model in due]):
                    changed()
            except Exception:  # a bug here must not end pricing for the node's lifetime
                log.exception("auto pricing failed this round")

    def evaluate(self, model: str, boards: list[DemandBoard]) -> bool:
        """One interval of `model`: decide, apply, log; True when its ask moved."""
        auto = self._auto[model]
        self._due[model] = time.monotonic() + auto.interval_s
        usage = self._usage.setdefault(model, _Usage(self._clock))
        offer = self.current.get(model)
        if offer is None:  # its engine is not up yet
            return False
        unmet = queued = unlimited = 0
        limits: list[int] = []  # each board's median max_price of its unmet requests
        reserved = False
        for board in boards:
            demand = _demand(model, board)
            if demand is None:
                continue
            unmet, queued = unmet + demand.unmet, queued + demand.queued
            unlimited += demand.unlimited
            if demand.would_pay is not None:
                limits.append(demand.would_pay)
            reserves = self._reserves.setdefault(board.coordinator_id, {})
            if reserves.get(model, (0, 0)) != demand.reserve:
                reserves[model], reserved = demand.reserve, True
        rung, ladder = self._state[model].rung, auto.ladder
        now_ask, next_ask = ladder.ask(rung)[1], ladder.ask(min(ladder.steps, rung + 1))[1]
        seen = Interval(usage.busy_share(offer.max_concurrency), unmet, queued,
                        would_pay(next_ask, unmet, unlimited, limits),
                        would_pay(now_ask, unmet, unlimited, limits))  # fmt: skip
        decision = decide(auto.ladder, self._state[model], seen)
        self._state[model] = decision.state
        ask = auto.ladder.ask(decision.state.rung)
        self.current[model] = self._priced(offer, ask)
        self._record(model, decision, ask, seen)
        return bool(decision.moved) or reserved

    def _record(self, model: str, decision: Decision, ask: tuple[int, int], seen: Interval) -> None:
        entry = {"at": round(time.time(), 3), "ask": list(ask), "rung": decision.state.rung,
                 "moved": decision.moved, "reason": decision.reason,
                 "seen": dataclasses.asdict(seen)}  # fmt: skip
        self.decisions[model].append(entry)
        level = logging.INFO if decision.moved else logging.DEBUG
        log.log(level, "ask for %s now %s/%s per 1M: %s", model, *ask, decision.reason)

    def _priced(self, offer: ModelOffer, ask: tuple[int, int]) -> ModelOffer:
        """`offer` at `ask`; the cached-prompt price as configured, never above the ask."""
        cached = self._configured.get(offer.name, offer).price_cached_prompt_per_mtok
        return dataclasses.replace(
            offer, price_prompt_per_mtok=ask[0], price_completion_per_mtok=ask[1],
            price_cached_prompt_per_mtok=None if cached is None else min(cached, ask[0]),
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """For the status file: each auto-priced model's ask, rung and recent decisions."""
        return {
            model: {"rung": self._state[model].rung, "steps": auto.ladder.steps,
                    "floor": list(auto.ladder.floor), "ceiling": list(auto.ladder.ceiling),
                    "decisions": list(self.decisions[model])[-10:]}
            for model, auto in self._auto.items()
        }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Demand:
    unmet: int  # turned away for lack of capacity in the last minute
    unlimited: int  # … of them with no max_price
    would_pay: int | None  # … the median max_price of the others (per 1M completion tokens)
    queued: int  # waiting for a slot now
    reserve: tuple[int, int]


def _demand(model: str, board: DemandBoard) -> _Demand | None:
    """`model` on one coordinator's board; None when it has no (or no well-formed) row for
    it: a board is signed, not necessarily sane."""
    try:
        row = board.board["models"][model]
        window = row["windows"][BOARD_WINDOW]
        limits = window.get("unmet_max_price") or {}
        p50 = limits.get("p50")
        reserve = row.get("reserve") or {}
        floor = (int(reserve.get("prompt", 0)), int(reserve.get("completion", 0)))
        found = _Demand(int(window["unmet"]["capacity"]), int(limits.get("unlimited", 0)),
                        None if p50 is None else int(p50), int(row["queue_depth"]),
                        floor)  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if min(found.unmet, found.unlimited, found.queued, *found.reserve) < 0:
        return None
    return found
