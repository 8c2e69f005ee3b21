"""A gossip round stays inside py-libp2p's limits (32 queued messages per peer, 10 messages/s
per peer and topic): adverts and attestations are packed, one message at a time, spaced out,
each a complete signed update that other coordinators accept."""

from __future__ import annotations

import time

from coordinator.services.network import (
    MIN_GAP_S,
    TOPIC,
    MarketNetwork,
    NetworkSettings,
)
from coordinator.services.registry import Registry, WorkerConnection
from p2p.node import P2PConfig
from protocol.advert import Advert, ModelOffer, sign_registration
from protocol.identity import Identity
from protocol.market import MAX_MESSAGE_BYTES, MarketUpdate, RelayedRegistration


class Evidence:
    """Trust's seam the network reads: this coordinator's own evidence per worker."""

    def __init__(self, workers: int) -> None:
        self.peer_evidence = None
        self._evidence = {f"node-{i}": (float(i), 0.5) for i in range(workers)}

    def local_evidence(self) -> dict[str, tuple[float, float]]:
        return self._evidence


class Wire:
    """Records what would go out on gossip, and when (the transport is not under test)."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str, bytes]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.addrs: list[str] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.sent.append((time.monotonic(), topic, data))
        self.in_flight -= 1


def connected_workers(registry: Registry, count: int) -> None:
    for _ in range(count):
        worker = Identity.generate()
        advert = Advert(worker.node_id, time.time_ns() // 1_000_000,
                        (ModelOffer("tiny", 4, 100, 200),))  # fmt: skip
        data, signature = sign_registration(worker, b"n" * 32, advert)
        proof = RelayedRegistration(data, b"n" * 32, signature)
        registry.add(WorkerConnection(worker.node_id, advert, registration=proof))


async def test_a_round_for_250_workers_and_600_attestations_is_paced_and_complete() -> None:
    me, registry = Identity.generate(), Registry()
    connected_workers(registry, 250)
    network = MarketNetwork(
        me, NetworkSettings(P2PConfig()), registry, Evidence(600),  # type: ignore[arg-type]
        lambda: ("127.0.0.1:1", "http://127.0.0.1:2/v1"),
    )  # fmt: skip
    wire = Wire()
    network.node = wire  # type: ignore[assignment]
    record = network.record(time.time_ns() // 1_000_000)
    await network._gossip(record)

    assert len(wire.sent) == 3 + 2  # ceil(250 / 100) advert messages + ceil(600 / 500)
    assert wire.most_in_flight == 1
    gaps = [b[0] - a[0] for a, b in zip(wire.sent, wire.sent[1:], strict=False)]
    assert min(gaps) >= MIN_GAP_S * 0.95
    assert len(wire.sent) / (wire.sent[-1][0] - wire.sent[0][0]) < 10  # messages per second
    updates = [MarketUpdate.open(data, time.time_ns() // 1_000_000, 60_000)
               for _at, topic, data in wire.sent if topic == TOPIC]  # fmt: skip
    assert all(len(data) <= MAX_MESSAGE_BYTES for _, _, data in wire.sent)
    assert [u.seq for u in updates] == [1, 2, 3, 4, 5]
    assert sum(len(u.registrations) for u in updates) == 250
    assert sum(len(u.attestations) for u in updates) == 600
    assert {r.verify().node_id for u in updates for r in u.registrations} == {
        c.node_id for c in registry.all()
    }
