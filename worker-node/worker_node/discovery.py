"""Finding coordinators without a configured address: ask the p2p market's DHT which
coordinators announce our models (or any model), fetch each one's signed record, and keep those
that verify and have not lapsed."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from p2p.errors import P2PError

if TYPE_CHECKING:
    from p2p.node import P2PNode
from protocol.errors import ProtocolError
from protocol.market import ANY_MODEL, CoordinatorRecord, model_key, record_key

log = logging.getLogger("agora.worker.discovery")


class CoordinatorFinder:
    def __init__(self, node: P2PNode, models: list[str], rng: random.Random | None = None) -> None:
        self._node = node
        self._models = models
        self._rng = rng or random.Random()

    async def find(self, exclude: set[str]) -> list[CoordinatorRecord]:
        """Live, verified coordinators not in `exclude`: those already serving one of our
        models first (clients of the model go there), the rest after; shuffled within each
        group so a fleet spreads over the market."""
        keys = [*(model_key(m) for m in self._models), model_key(ANY_MODEL)]
        found = await asyncio.gather(*(self._node.providers(k) for k in keys),
                                     return_exceptions=True)  # fmt: skip
        ids: list[str] = []
        for key, result in zip(keys, found, strict=True):
            if isinstance(result, P2PError):
                log.info("provider lookup %s failed: %s", key, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                ids += result
        records: list[CoordinatorRecord] = []
        for coordinator_id in dict.fromkeys(ids):
            if coordinator_id in exclude:
                continue
            record = await self._record(coordinator_id)
            if record is not None:
                records.append(record)
        self._rng.shuffle(records)
        serving = [r for r in records if set(r.models) & set(self._models)]
        return serving + [r for r in records if r not in serving]

    async def forget(self, coordinator_id: str) -> None:
        """It stopped answering: drop it from the DHT routing table too (a lookup that asks a
        dead peer waits out py-libp2p's 10 s query timeout)."""
        try:
            await self._node.forget(coordinator_id)
        except P2PError as exc:
            log.info("could not forget %s: %s", coordinator_id, exc)

    async def _record(self, coordinator_id: str) -> CoordinatorRecord | None:
        try:
            data = await self._node.get(record_key(coordinator_id))
        except P2PError as exc:
            log.info("record of %s unreachable: %s", coordinator_id, exc)
            return None
        if data is None:
            return None
        try:
            record = CoordinatorRecord.open(data, time.time_ns() // 1_000_000)
        except ProtocolError as exc:  # forged, or lapsed: that coordinator is gone
            log.info("ignoring the record of %s: %s", coordinator_id, exc)
            return None
        return record if record.coordinator_id == coordinator_id else None
