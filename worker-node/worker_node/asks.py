"""The node's asks: the offers it signs now, the recent ones a job may still be priced at, and
(for models priced `auto`) the loop that moves them with demand (rule: worker_node.pricing).

A job is signed at the prices of the advert the coordinator routed it on (the job names it):
a price change and a job can cross on the wire, and the receipt must show what the client
was quoted. Every advert the node makes is remembered for that, the last HISTORY of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from protocol.advert import Advert, ModelOffer
from protocol.market import DemandBoard
from worker_node.pricing import Decision, Interval, PriceLadder, PriceState, decide

log = logging.getLogger("agora.worker.asks")

HISTORY = 64  # adverts remembered (a job names the one it was priced at)
DECISIONS = 50  # kept per model for the status file and `agora worker status`
BOARD_WINDOW = "60s"  # the boards' window the rule reads


@dataclasses.dataclass(frozen=True)
class AutoPrice:
    ladder: PriceLadder
    interval_s: float


@dataclasses.dataclass
class _Usage:
    """One model's jobs over the current interval."""

    running: int = 0
    peak: int = 0  # most jobs at once this interval
    ran: int = 0  # jobs that ran at some moment of it (started, or still running)

    def restart(self) -> None:
        self.peak = self.ran = self.running


class Asks:
    def __init__(self, auto: dict[str, AutoPrice] | None = None) -> None:
        self._auto = auto or {}
        self.current: dict[str, ModelOffer] = {}
        self._history: OrderedDict[int, dict[str, ModelOffer]] = OrderedDict()
        self._usage: dict[str, _Usage] = {}
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
        auto = self._auto.get(offer.name)
        if auto is not None:
            offer = self._priced(offer, auto.ladder.ask(self._state[offer.name].rung))
        self.current[offer.name] = offer

    # ---------------------------------------------------------------- what jobs see
    def remember(self, advert: Advert) -> None:
        self._history[advert.issued_at_ms] = {o.name: o for o in advert.models}
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)

    def priced(self, model: str, advert_issued_at_ms: int = 0) -> ModelOffer | None:
        """The offer a job is signed at: the advert's it was routed on, else the current."""
        advert = self._history.get(advert_issued_at_ms) if advert_issued_at_ms else None
        if advert is not None and model in advert:
            return advert[model]
        return self.current.get(model)

    @contextlib.contextmanager
    def running(self, model: str) -> Iterator[None]:
        usage = self._usage.setdefault(model, _Usage())
        usage.running += 1
        usage.ran += 1
        usage.peak = max(usage.peak, usage.running)
        try:
            yield
        finally:
            usage.running -= 1

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
            seen = await boards()
            if any([self.evaluate(model, seen) for model in due]):
                changed()

    def evaluate(self, model: str, boards: list[DemandBoard]) -> bool:
        """One interval of `model`: decide, apply, log; True when its ask moved."""
        auto = self._auto[model]
        self._due[model] = time.monotonic() + auto.interval_s
        usage = self._usage.setdefault(model, _Usage())
        offer = self.current.get(model)
        if offer is None:  # its engine is not up yet
            return False
        unmet, queued, reserve = _demand(model, boards)
        seen = Interval(full=usage.peak >= offer.max_concurrency, jobs=usage.ran, unmet=unmet,
                        queued=queued)  # fmt: skip
        usage.restart()
        decision = decide(auto.ladder, self._state[model], seen)
        self._state[model] = decision.state
        ask = auto.ladder.ask(decision.state.rung, reserve)
        moved = ask != (offer.price_prompt_per_mtok, offer.price_completion_per_mtok)
        self.current[model] = self._priced(offer, ask)
        self._record(model, decision, ask, seen)
        return moved

    def _record(self, model: str, decision: Decision, ask: tuple[int, int], seen: Interval) -> None:
        entry = {"at": round(time.time(), 3), "ask": list(ask), "rung": decision.state.rung,
                 "moved": decision.moved, "reason": decision.reason,
                 "seen": dataclasses.asdict(seen)}  # fmt: skip
        self.decisions[model].append(entry)
        level = logging.INFO if decision.moved else logging.DEBUG
        log.log(level, "ask for %s now %s/%s per 1M: %s", model, *ask, decision.reason)

    def _priced(self, offer: ModelOffer, ask: tuple[int, int]) -> ModelOffer:
        cached = offer.price_cached_prompt_per_mtok
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


def _demand(model: str, boards: list[DemandBoard]) -> tuple[int, int, tuple[int, int]]:
    """(requests turned away for lack of capacity, requests queued now, the highest reserve
    price) for `model` over every coordinator's board."""
    unmet = queued = 0
    reserve = (0, 0)
    for board in boards:
        row = board.board.get("models", {}).get(model)
        if not isinstance(row, dict):
            continue
        window = row.get("windows", {}).get(BOARD_WINDOW, {})
        unmet += int(window.get("unmet", {}).get("capacity", 0) or 0)
        queued += int(row.get("queue_depth", 0) or 0)
        floor = row.get("reserve") or {}
        reserve = (max(reserve[0], int(floor.get("prompt", 0) or 0)),
                   max(reserve[1], int(floor.get("completion", 0) or 0)))  # fmt: skip
    return unmet, queued, reserve
