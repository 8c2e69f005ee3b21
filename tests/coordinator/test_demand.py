"""The demand board: sliding windows of what was served and what was left unmet, the same
numbers as the coordinator's own counters, signed, gossiped, and a forged board refused."""

from __future__ import annotations

import json
import time

import pytest

from coordinator.app import Coordinator
from coordinator.errors import InvalidRequest, ModelNotFound, NoCapacity
from coordinator.services.demand import DemandBook
from coordinator.services.network import TOPIC, MarketNetwork, NetworkSettings
from coordinator.services.registry import Registry
from p2p.node import P2PConfig
from protocol.canonical import canonical_json
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.market import DemandBoard, MarketUpdate
from protocol.proto import session_pb2 as pb
from tests.coordinator.test_gossip_pacing import Wire
from tests.coordinator.test_request_path import (
    MODEL,
    PlayedWorker,
    Script,
    chat,
    client,
    join,
    relay,
)
from tests.fake_clock import Clock


def test_windows_slide_and_old_buckets_go() -> None:
    clock = Clock()
    book = DemandBook(Registry(), lambda _node: "H100", clock)
    book.served("m", "n1", 100, 10, (1000, 2000), 0.0)
    clock.now += 120
    book.served("m", "n1", 100, 10, (3000, 4000), 0.5)
    book.unmet("m", "capacity")
    book.unmet("m", "price")
    clock.now += 30
    board = book.board()["models"]["m"]["windows"]
    assert board["60s"]["requests"] == 1
    assert board["300s"]["requests"] == 2
    assert board["300s"]["prompt_tokens"] == 200
    assert board["60s"]["unmet"] == {"capacity": 1, "price": 1}
    assert board["60s"]["unmet_share_bps"] == 6666
    assert board["60s"]["mean_wait_ms"] == 500
    assert board["300s"]["clearing_price"]["completion"]["p50"] in (2000, 4000)
    assert board["300s"]["served_by_gpu"] == {"H100": 2}
    clock.now += 3700  # past the longest window: nothing is kept
    assert book.board()["models"] == {}


def test_queue_depth_counts_requests_waiting_now() -> None:
    book = DemandBook(Registry(), lambda _node: "cpu")
    book.waiting("m", +1)
    book.waiting("m", +1)
    book.waiting("m", -1)
    assert book.board()["models"]["m"]["queue_depth"] == 1


def test_a_model_is_wanted_while_its_queue_reaches_the_threshold() -> None:
    """The "add replicas when queue depth exceeds 50" rule, per model: the board calls on
    providers to load it."""
    clock = Clock()
    book = DemandBook(Registry(), lambda _node: "cpu", clock,
                      wanted_at=lambda model: 3 if model == "m" else 50)  # fmt: skip
    for _ in range(3):
        book.waiting("m", +1)
        book.waiting("other", +1)
    board = book.board()["models"]
    assert board["m"]["wanted"]
    assert not board["other"]["wanted"]  # 3 of its 50
    book.waiting("m", -1)
    clock.now += 60  # the next build
    assert not book.board()["models"]["m"]["wanted"]


def _sample(coordinator: Coordinator, name: str, **labels: str) -> float:
    total = 0.0
    for family in coordinator.metrics.exposed().collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_the_board_matches_the_coordinators_own_counters(coordinator: Coordinator) -> None:
    join(coordinator, PlayedWorker("w"))
    principal = await client(coordinator)
    for _ in range(5):
        await relay(await coordinator.request_path.begin(principal, chat()))
    cheap = chat()
    cheap = cheap.__class__(**{**cheap.__dict__, "prefs": cheap.prefs.__class__(
        max_price_prompt=1, max_price_completion=1)})  # fmt: skip
    with pytest.raises(InvalidRequest):
        await coordinator.request_path.begin(principal, cheap)
    full = pb.JobError(http_status=503, message="full", type="engine_overloaded",
                       retryable=True, overloaded=True)  # fmt: skip
    busy = PlayedWorker("busy", Script(fail_before=full))
    first = coordinator.registry.get(coordinator.registry.pool(MODEL)[0].node_id)
    assert first is not None
    coordinator.registry.remove(first)
    join(coordinator, busy)
    with pytest.raises(NoCapacity):
        await coordinator.request_path.begin(principal, chat())
    made_up = chat()
    made_up = made_up.__class__(**{**made_up.__dict__, "model": "x" * 5000})
    with pytest.raises(ModelNotFound):  # a name no worker serves never reaches the board
        await coordinator.request_path.begin(principal, made_up)
    await coordinator.request_path.drain()
    row = coordinator.demand.board()["models"][MODEL]["windows"]["60s"]
    assert row["requests"] == _sample(coordinator, "agora_requests_total", model=MODEL,
                                      status="ok") == 5  # fmt: skip
    assert row["completion_tokens"] == _sample(coordinator, "agora_tokens_total", model=MODEL,
                                               kind="completion")  # fmt: skip
    assert row["prompt_tokens"] == _sample(coordinator, "agora_tokens_total", model=MODEL,
                                           kind="prompt")  # fmt: skip
    assert row["unmet"] == {"capacity": 1, "price": 1}
    assert list(coordinator.demand.board()["models"]) == [MODEL]


def test_a_board_is_signed_gossiped_and_a_forged_one_refused() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    book = DemandBook(Registry(), lambda _node: "cpu")
    book.served("m", "n", 10, 5, (100, 200), 0.0)

    def sealed() -> bytes:
        return DemandBoard(alice.node_id, time.time_ns() // 1_000_000, book.board()).seal(alice)

    def network(me: Identity, board: object = None) -> MarketNetwork:
        made = MarketNetwork(me, NetworkSettings(P2PConfig()), Registry(), None,
                             lambda: ("127.0.0.1:1", "http://127.0.0.1:2/v1"),
                             board)  # type: ignore[arg-type]  # fmt: skip
        made.node = Wire()  # type: ignore[assignment]
        return made

    reader = network(bob)
    genuine = sealed()
    reader._on_message(TOPIC, genuine, "alice")  # alice is nobody yet: refused
    assert reader.peer_boards() == []
    assert reader.view.rejected["board_of_unknown_coordinator"] == 1
    now_ms = time.time_ns() // 1_000_000
    introduction = MarketUpdate(alice.node_id, 1, now_ms, network(alice).record(now_ms))
    reader._on_message(TOPIC, introduction.seal(alice), "alice")  # her live record …
    reader._on_message(TOPIC, genuine, "alice")  # … and then her board is kept
    assert reader.peer_boards() == [genuine]
    forged_body = json.loads(genuine)
    forged_body["body"]["board"]["models"]["m"]["windows"]["60s"]["requests"] = 1000
    forged = canonical_json(forged_body)
    with pytest.raises(ProtocolError):
        DemandBoard.open(forged, time.time_ns() // 1_000_000, 60_000)
    reader._on_message(TOPIC, forged, "mallory")
    assert reader.view.rejected["forged_board"] == 1
    assert reader.peer_boards() == [genuine]  # the genuine one stays
    ahead = DemandBoard(alice.node_id, now_ms + 3_600_000, book.board()).seal(alice)
    with pytest.raises(ProtocolError):  # dated an hour ahead: refused, not kept as newest
        DemandBoard.open(ahead, now_ms, 60_000)


async def test_a_gossip_round_publishes_the_board(monkeypatch: pytest.MonkeyPatch) -> None:
    alice = Identity.generate()
    board = DemandBoard(alice.node_id, time.time_ns() // 1_000_000, {"models": {}}).seal(alice)
    made = MarketNetwork(alice, NetworkSettings(P2PConfig()), Registry(), None,
                         lambda: ("127.0.0.1:1", "http://127.0.0.1:2/v1"),
                         lambda: board)  # fmt: skip
    wire = Wire()
    made.node = wire  # type: ignore[assignment]
    await made._gossip_round()
    assert wire.sent[-1][1:] == (TOPIC, board)
