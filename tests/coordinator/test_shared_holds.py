"""Credit holds in the database: two coordinator replicas (two engines, two ledger writers) on
one PostgreSQL database never hold more than the client has, together. On SQLite (one
coordinator per file: a second writer process would get `database is locked`) the two books
share the one writer, as they would in one process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from billing.ledger import deposit, request_charge
from billing.pricing import Charge
from coordinator.errors import InsufficientCredit
from coordinator.services.shared_holds import SharedReservations
from coordinator.store import holds_store, ledger_store
from coordinator.store.db import make_engine
from coordinator.store.writer import LedgerWriter


@pytest.fixture
def replicas(engine: Engine, database_url: str) -> Iterator[list[SharedReservations]]:
    second = make_engine(database_url)  # its own connection pool, like another process
    first_writer = LedgerWriter(engine)
    writers = [first_writer, first_writer if database_url.startswith("sqlite") else
               LedgerWriter(second)]  # fmt: skip
    yield [SharedReservations(w) for w in writers]
    for w in writers:
        w.close()
    second.dispose()


def held(engine: Engine, client: str) -> int:
    with engine.connect() as conn:
        return holds_store.held_by(conn, client)


async def test_replicas_together_never_hold_more_than_the_balance(
    engine: Engine, replicas: list[SharedReservations]
) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "alice", 1_000))

    async def try_hold(book: SharedReservations) -> int:
        try:
            await book.hold("alice", 70)
        except InsufficientCredit:
            return 0
        return 70

    taken = await asyncio.gather(*(try_hold(replicas[i % 2]) for i in range(60)))
    assert sum(taken) == 14 * 70  # 1000 // 70 holds fit, wherever they were asked for
    assert held(engine, "alice") == 14 * 70
    with pytest.raises(InsufficientCredit, match="980 is held by requests in flight"):
        await replicas[1].hold("alice", 30)


async def test_charge_then_release_frees_exactly_what_was_not_spent(
    engine: Engine, replicas: list[SharedReservations]
) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "bob", 100))
    first = await replicas[0].hold("bob", 60)
    second = await replicas[1].hold("bob", 40)
    with pytest.raises(InsufficientCredit):
        await replicas[1].hold("bob", 1)
    with Session(engine) as session:  # the first request cost 25 of its 60
        ledger_store.post(session, request_charge("r1", "bob", "n1", Charge(20, 5)))
    first.release()
    first.release()  # idempotent
    await replicas[0].drain()
    assert held(engine, "bob") == 40
    await replicas[1].hold("bob", 35)  # 100 - 25 - 40 = 35 is free now
    with pytest.raises(InsufficientCredit):
        await replicas[0].hold("bob", 1)
    second.release()
    await replicas[1].drain()
    assert held(engine, "bob") == 35


async def test_a_hold_can_grow_only_within_the_balance(
    engine: Engine, replicas: list[SharedReservations]
) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "carol", 100))
    hold = await replicas[0].hold("carol", 30)
    assert await replicas[0].hold("carol", 20, hold) is hold  # never shrinks
    await replicas[0].hold("carol", 90, hold)
    assert held(engine, "carol") == 90
    with pytest.raises(InsufficientCredit):
        await replicas[1].hold("carol", 11)
    with pytest.raises(InsufficientCredit):
        await replicas[0].hold("carol", 101, hold)
    assert hold.amount == 90


async def test_expired_holds_stop_counting(engine: Engine, database_url: str) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "dave", 100))
    writer = LedgerWriter(engine)
    try:
        dead_replica = SharedReservations(writer, ttl_s=0.05)
        await dead_replica.hold("dave", 100)  # never released: its replica "died"
        await asyncio.sleep(0.1)
        live = SharedReservations(writer)
        await live.hold("dave", 100)
        with engine.begin() as conn:
            assert holds_store.purge_expired_in(conn) == 1
        assert held(engine, "dave") == 100
    finally:
        writer.close()
