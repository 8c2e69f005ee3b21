"""This coordinator's part in the p2p market: it announces itself in the DHT (a signed record
under its id, provider entries for the models it serves and for "any model"), gossips the
signed registrations of its workers and its reputation attestations, and folds what other
coordinators gossip into the MarketView.

Pacing (py-libp2p drops messages above 32 queued per peer and rate-limits a topic to 10
messages/s per peer): one gossip round every `announce_s` sends ceil(workers/100) +
ceil(attested/500) messages, one at a time and at least `MIN_GAP_S` apart, so a coordinator
never has more than one message queued and stays under 7 messages/s; every message is a
complete signed update (a lost one is made good by the next round). Duplicates are dropped by
gossipsub's seen-cache and replays by the issuer's sequence number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.services.market_view import MarketView
from coordinator.services.registry import Registry
from coordinator.services.trust import Trust
from p2p.errors import P2PError
from p2p.node import P2PConfig, P2PNode
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.market import (
    ANY_MODEL,
    BOARD_PREFIX,
    RECORD_NAMESPACE,
    Attestation,
    CoordinatorRecord,
    DemandBoard,
    MarketUpdate,
    RelayedRegistration,
    model_key,
    record_key,
    record_version,
)

log = logging.getLogger("agora.coordinator.network")
TOPIC = "agora/market/v1"
REGISTRATIONS_PER_MESSAGE = 100
ATTESTATIONS_PER_MESSAGE = 500
MIN_GAP_S = 0.15  # between two gossip messages of one round


@dataclass(frozen=True)
class NetworkSettings:
    p2p: P2PConfig
    announce_s: float = 10.0  # how often the record, provider entries and gossip go out
    record_ttl_s: float = 30.0  # a coordinator silent this long is dropped by everyone
    attestation_weight: float = 0.5  # a fully trusted peer's evidence counts this much of ours


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MarketNetwork:
    def __init__(
        self,
        identity: Identity,
        settings: NetworkSettings,
        registry: Registry,
        trust: Trust | None,
        endpoints: Callable[[], tuple[str, str]],  # (gRPC target for workers, client API URL)
        board: Callable[[], bytes] | None = None,  # this coordinator's sealed demand board
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.registry = registry
        self.trust = trust
        self.view = MarketView(identity.node_id, settings.attestation_weight)
        self._endpoints = endpoints
        self._board = board
        self.node = P2PNode(
            identity.seed(), settings.p2p, record_namespace=RECORD_NAMESPACE,
            check_record=self._check_record, record_version=record_version,
            on_message=self._on_message,
        )  # fmt: skip
        self._seq = 0
        self._provided: dict[str, float] = {}  # provider key -> when last announced
        self._tasks: list[asyncio.Task[None]] = []
        self.rounds = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> list[str]:
        addrs = await self.node.start()
        self._tasks = [asyncio.create_task(self._every_round(step)) for step in
                       (self._gossip_round, self._dht_round, self._tidy_round)]  # fmt: skip
        log.info("p2p market: %s", " ".join(addrs))
        return addrs

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.node.stop()

    async def _every_round(self, step: Callable[[], Awaitable[None]]) -> None:
        """Gossip, DHT upkeep and tidying each keep their own pace: a DHT operation stuck on a
        peer that just died must not delay gossip (peers would think us gone) or the dropping
        of lapsed coordinators."""
        while True:
            started = time.monotonic()
            try:
                await step()
            except P2PError as exc:  # repeated next round
                log.warning("p2p %s failed: %s", step.__name__, exc)
            await asyncio.sleep(max(0.0, self.settings.announce_s - (time.monotonic() - started)))

    # ------------------------------------------------------------------ outgoing
    def record(self, now_ms: int) -> CoordinatorRecord:
        grpc_target, api_url = self._endpoints()
        models = tuple(sorted({o.name for c in self.registry.all() for o in c.advert.models}))
        ttl_ms = int(self.settings.record_ttl_s * 1000)
        return CoordinatorRecord(self.identity.node_id, grpc_target, api_url, models, now_ms,
                                 now_ms + ttl_ms)  # fmt: skip

    async def _gossip_round(self) -> None:
        await self._gossip(self.record(_now_ms()))
        if self._board is not None:
            await asyncio.sleep(MIN_GAP_S)
            await self.node.publish(TOPIC, self._board())

    async def _dht_round(self) -> None:
        record = self.record(_now_ms())
        await self._provide(record)
        await self.node.put(record_key(self.identity.node_id), record.seal(self.identity))

    async def _tidy_round(self) -> None:
        self.view.expire(_now_ms())
        self.view.boards(_now_ms(), int(self.settings.record_ttl_s * 1000))  # drops stale ones
        if self.trust is not None:
            self.view.rate_issuers(self.trust.local_evidence())
        self.rounds += 1

    async def _provide(self, record: CoordinatorRecord) -> None:
        keys = [model_key(ANY_MODEL), *(model_key(m) for m in record.models)]
        for key in keys:  # provider entries live long in the DHT: refresh them now and then
            if time.monotonic() - self._provided.get(key, -1e9) > self.settings.record_ttl_s:
                await self.node.provide(key)
                self._provided[key] = time.monotonic()

    async def _gossip(self, record: CoordinatorRecord) -> None:
        registrations: list[RelayedRegistration] = [
            c.registration for c in self.registry.all() if c.registration is not None
        ]
        evidence = self.trust.local_evidence() if self.trust is not None else {}
        attestations = [Attestation(n, round(g * 1000), round(b * 1000))
                        for n, (g, b) in sorted(evidence.items())]  # fmt: skip
        parts: list[tuple[Sequence[RelayedRegistration], Sequence[Attestation]]] = [
            (chunk, ()) for chunk in _chunks(registrations, REGISTRATIONS_PER_MESSAGE)
        ] + [((), chunk) for chunk in _chunks(attestations, ATTESTATIONS_PER_MESSAGE)]
        for i, (regs, atts) in enumerate(parts or [((), ())]):
            if i:
                await asyncio.sleep(MIN_GAP_S)
            self._seq += 1
            update = MarketUpdate(self.identity.node_id, self._seq, _now_ms(), record,
                                  tuple(regs), tuple(atts))  # fmt: skip
            await self.node.publish(TOPIC, update.seal(self.identity))

    # ------------------------------------------------------------------ incoming
    def _check_record(self, key: str, value: bytes) -> None:
        """DHT validator: only a live record signed by the coordinator its key names."""
        record = CoordinatorRecord.open(value, _now_ms())
        if key != record_key(record.coordinator_id):
            raise ProtocolError("record stored under another coordinator's key")

    def _on_message(self, topic: str, data: bytes, sender: str) -> None:
        if topic != TOPIC:
            return
        max_age_ms = int(self.settings.record_ttl_s * 1000)
        if data.startswith(BOARD_PREFIX):
            self._on_board(data, sender, max_age_ms)
            return
        try:
            update = MarketUpdate.open(data, _now_ms(), max_age_ms)
        except ProtocolError as exc:
            text = str(exc).lower()  # stale: often gossipsub replaying old messages to a newcomer
            reason = "bad_signature" if "signature" in text else "stale" if "stale" in text else (
                "malformed")  # fmt: skip
            self.view.reject(reason)
            log.log(logging.INFO if reason == "stale" else logging.WARNING,
                    "refused a market update from %s: %s", sender, exc)  # fmt: skip
            return
        self.view.accept(update, _now_ms())

    def _on_board(self, data: bytes, sender: str, max_age_ms: int) -> None:
        try:
            board = DemandBoard.open(data, _now_ms(), max_age_ms)
        except ProtocolError as exc:
            reason = "forged_board" if "signature" in str(exc).lower() else "malformed_board"
            self.view.reject(reason)
            log.warning("refused a demand board from %s: %s", sender, exc)
            return
        self.view.accept_board(board, data)

    # ------------------------------------------------------------------ reading
    def peer_boards(self) -> list[bytes]:
        """Other coordinators' fresh demand boards, as they signed them."""
        max_age_ms = int(self.settings.record_ttl_s * 1000)
        return [sealed for _b, sealed in self.view.boards(_now_ms(), max_age_ms)]

    def elsewhere(self, model: str) -> list[str]:
        """Client API URLs of other coordinators that report workers for `model`."""
        return [r.api_url for r in self.view.serving(model)]

    async def describe(self) -> dict[str, Any]:
        local = self.trust.local_evidence() if self.trust is not None else {}
        now_ms = _now_ms()
        try:
            peers = await self.node.connected_peers()
        except P2PError:
            peers = []
        return {
            "enabled": True,
            "peer_id": self.identity.node_id,
            "addrs": self.node.addrs,
            "bootstrap": list(self.settings.p2p.bootstrap),
            "connected_peers": peers,
            "rounds": self.rounds,
            "coordinators": [
                {"coordinator_id": p.record.coordinator_id, "api_url": p.record.api_url,
                 "grpc_target": p.record.grpc_target, "models": list(p.record.models),
                 "workers": sorted(p.workers), "seen_ms_ago": now_ms - p.seen_ms,
                 "attested": {n: [round(g, 3), round(b, 3)] for n, (g, b) in
                              sorted(p.attestations.items())},
                 "standing": round(self.view.standing(cid, local), 3)}
                for cid, p in ((p.record.coordinator_id, p) for p in self.view.coordinators())
            ],
            "workers": [
                {"node_id": n, "models": [o.name for o in w.advert.models], "via": list(w.via)}
                for n, w in sorted(self.view.workers().items())
            ],
            "accepted": self.view.accepted,
            "rejected": dict(self.view.rejected),
        }  # fmt: skip
