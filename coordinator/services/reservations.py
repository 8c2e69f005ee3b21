"""Credit held for requests in flight, so that concurrent requests can never together spend
more than a client has.

Before dispatch a request holds its worst-case cost (prompt bound + max_tokens at the chosen
price); the hold is released only after its charge is committed, so `balance - held` never
over-states what is free: a balance read that raced a commit either already shows the charge
or still counts the hold that covers it. A read that overlapped a commit whose hold was
already released is detected by the per-client generation and repeated.

These holds live in this process: right for one coordinator per database (the SQLite
default). Replicas sharing one PostgreSQL use `shared_holds.SharedReservations`, which keeps
them in the database; both are a `HoldBook`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from coordinator.errors import InsufficientCredit


class Hold:
    """One request's reservation (idempotent release)."""

    def __init__(self, book: HoldBook, client: str, amount: int, hold_id: str = "") -> None:
        self._book = book
        self.client = client
        self.amount = amount
        self.hold_id = hold_id  # its row, where the book keeps holds in the database
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._book.released(self)


def refusal(amount: int, balance: int, held: int) -> InsufficientCredit:
    return InsufficientCredit(
        f"This request may cost up to {amount} micro-units; the balance is {balance}"
        + (f", of which {held} is held by requests in flight" if held > 0 else "")
        + ". Lower max_tokens or add credit."
    )


class HoldBook(ABC):
    @abstractmethod
    async def hold(self, client: str, amount: int, current: Hold | None = None) -> Hold:
        """Hold `amount` (or raise `current` to it), or raise InsufficientCredit (402)."""

    @abstractmethod
    def posted(self, client: str, amount: int | None = None) -> None:
        """A charge (of `amount`, if known) to `client` was committed: call before releasing
        the hold behind it."""

    @abstractmethod
    def released(self, hold: Hold) -> None:
        """Give the hold's credit back (called once, by Hold.release)."""


class Reservations(HoldBook):
    """Holds in this process, over a balance read from the database at most every
    `refresh_s` per client: this coordinator's own charges are applied to the cached balance
    as they post (it is the only one spending from these accounts), deposits made elsewhere
    show within `refresh_s`, and a request the cache would refuse is checked against a fresh
    read first."""

    def __init__(self, read_balance: Callable[[str], int], refresh_s: float = 1.0) -> None:
        self._read_balance = read_balance
        self._refresh_s = refresh_s
        self._held: dict[str, int] = {}
        self._generation: dict[str, int] = {}
        self._balances: dict[str, tuple[int, float]] = {}  # client -> (balance, read at)

    def held(self, client: str) -> int:
        return self._held.get(client, 0)

    def _take(self, client: str, amount: int) -> None:
        left = self._held.get(client, 0) + amount
        if left:
            self._held[client] = left
        else:
            self._held.pop(client, None)

    async def available(self, client: str, *, fresh: bool = False) -> tuple[int, int]:
        """(balance, balance minus what requests in flight hold)."""
        cached = self._balances.get(client)
        if cached is not None and not fresh and time.monotonic() - cached[1] < self._refresh_s:
            return cached[0], cached[0] - self.held(client)
        while True:
            generation = self._generation.get(client, 0)
            read_at = time.monotonic()
            balance = await asyncio.to_thread(self._read_balance, client)
            if self._generation.get(client, 0) == generation:
                self._balances[client] = (balance, read_at)
                return balance, balance - self.held(client)

    def posted(self, client: str, amount: int | None = None) -> None:
        self._generation[client] = self._generation.get(client, 0) + 1
        cached = self._balances.get(client)
        if cached is None:
            return
        if amount is None:
            del self._balances[client]
        else:  # a read that already saw the charge under-states the balance: safe, and brief
            self._balances[client] = (cached[0] - amount, cached[1])

    def released(self, hold: Hold) -> None:
        self._take(hold.client, -hold.amount)

    async def hold(self, client: str, amount: int, current: Hold | None = None) -> Hold:
        extra = amount - (current.amount if current else 0)
        if current is not None and extra <= 0:
            return current
        balance, free = await self.available(client)
        if free < extra:  # the cache may predate a deposit: look again before refusing
            balance, free = await self.available(client, fresh=True)
        if free < extra:  # no await between this check and the hold: atomic on the loop
            raise refusal(amount, balance, balance - free)
        self._take(client, extra)
        if current is not None:
            current.amount = amount
            return current
        return Hold(self, client, amount)
