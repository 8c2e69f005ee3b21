"""Credit holds: concurrent requests can never together spend more than the client has."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.errors import InsufficientCredit
from coordinator.services.reservations import Reservations


class Books:
    """A balance store whose reads can be paused mid-flight (to race a commit)."""

    def __init__(self, balance: int) -> None:
        self.balance = balance

    def read(self, client: str) -> int:
        return self.balance


async def test_holds_add_up_and_refuse_what_is_not_free() -> None:
    book = Reservations(Books(100).read)
    first = await book.hold("a", 60)
    with pytest.raises(InsufficientCredit, match="held by requests in flight"):
        await book.hold("a", 50)
    second = await book.hold("a", 40)
    assert book.held("a") == 100
    first.release()
    first.release()  # idempotent
    assert book.held("a") == 40
    second.release()
    assert book.held("a") == 0


async def test_a_hold_can_grow_only_into_free_credit() -> None:
    book = Reservations(Books(100).read)
    hold = await book.hold("a", 30)
    assert await book.hold("a", 20, hold) is hold  # never shrinks
    assert hold.amount == 30
    await book.hold("a", 90, hold)
    assert book.held("a") == 90
    with pytest.raises(InsufficientCredit):
        await book.hold("a", 101, hold)
    assert book.held("a") == 90


async def test_many_concurrent_holds_never_exceed_the_balance() -> None:
    book = Reservations(Books(1_000).read)

    async def one() -> bool:
        try:
            await book.hold("a", 7)
        except InsufficientCredit:
            return False
        return True

    granted = await asyncio.gather(*(one() for _ in range(300)))
    assert sum(granted) == 1_000 // 7
    assert book.held("a") == (1_000 // 7) * 7


async def test_a_read_that_raced_a_commit_is_repeated() -> None:
    books = Books(100)
    reads: list[int] = []

    def read(client: str) -> int:
        reads.append(books.balance)
        if len(reads) == 1:  # a charge of 80 commits while this first read is in flight
            books.balance = 20
            book.posted("a")
            hold.release()
            return 100  # the stale value this read had already taken
        return books.balance

    book = Reservations(lambda c: 100)
    hold = await book.hold("a", 80)
    book._read_balance = read
    with pytest.raises(InsufficientCredit):
        await book.hold("a", 50)  # 100 - 0 would admit it; the repeated read sees 20
    assert len(reads) == 2


async def test_the_balance_is_read_once_per_refresh_and_charges_apply_to_it() -> None:
    books = Books(1_000)
    reads: list[int] = []

    def read(client: str) -> int:
        reads.append(books.balance)
        return books.balance

    book = Reservations(read, refresh_s=60)
    for _ in range(50):  # admissions within the refresh window share one read
        hold = await book.hold("a", 10)
        books.balance -= 10  # the charge commits...
        book.posted("a", 10)  # ...and this coordinator applies it to the cached balance
        hold.release()
    assert reads == [1_000]
    assert (await book.available("a"))[0] == 500
    with pytest.raises(InsufficientCredit):
        await book.hold("a", 600)  # refused only after a fresh read
    assert reads == [1_000, 500]
    books.balance = 10_000  # a deposit made elsewhere: a request the cache would refuse sees it
    assert (await book.hold("a", 5_000)).amount == 5_000
