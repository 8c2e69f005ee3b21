"""Credit holds kept in the database, so coordinator replicas sharing one PostgreSQL can never
together admit more than a client has.

Taking a hold is a unit of work on the ledger writer (it batches with settlements: one commit
for many) that locks the client's account row; see store.holds_store. The charge is committed
before the hold row is deleted, so a concurrent admission anywhere sees the charge, the hold, or
both, never neither.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from coordinator.services.reservations import Hold, HoldBook, refusal
from coordinator.store import holds_store
from coordinator.store.writer import LedgerWriter

log = logging.getLogger("agora.coordinator.holds")


class SharedReservations(HoldBook):
    def __init__(self, writer: LedgerWriter, ttl_s: float = 3600.0) -> None:
        self._writer = writer
        self._ttl_s = ttl_s  # a hold left by a replica that died stops counting after this
        self._releases: set[asyncio.Task[Any]] = set()

    async def hold(self, client: str, amount: int, current: Hold | None = None) -> Hold:
        if current is not None and amount <= current.amount:
            return current
        if amount <= 0:  # free work needs no row
            return Hold(self, client, 0)
        hold_id = current.hold_id if current is not None and current.hold_id else uuid.uuid4().hex
        exists = current is not None and bool(current.hold_id)
        refused = await self._writer.submit(
            lambda conn: holds_store.acquire_in(
                conn, hold_id, client, amount, self._ttl_s, exists=exists
            )
        )
        if refused is not None:
            raise refusal(amount, refused.balance, refused.held)
        if current is not None:
            current.amount, current.hold_id = amount, hold_id
            return current
        return Hold(self, client, amount, hold_id)

    def posted(self, client: str, amount: int | None = None) -> None:
        """Nothing to do: the database orders the charge before the release."""

    def released(self, hold: Hold) -> None:
        if not hold.hold_id:
            return
        hold_id = hold.hold_id
        task = asyncio.get_running_loop().create_task(
            self._writer.submit(lambda conn: holds_store.release_in(conn, hold_id))
        )
        self._releases.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[Any]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not release credit hold (it expires on its own): %s",
                      task.exception())  # fmt: skip

    async def drain(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
