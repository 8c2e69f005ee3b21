"""Credit holds in the database, taken under the client's account row lock.

`acquire_in` locks the account row (`SELECT … FOR UPDATE` on PostgreSQL; SQLite has one writer
at a time anyway), sums the live holds and inserts or raises this one only if the balance covers
them all, so replicas admitting requests for the same client at once are serialized on that
row. Runs inside the ledger writer's transaction, like the postings it guards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, delete, func, insert, select, update

from billing.ledger import client_account
from coordinator.store.models import utcnow
from coordinator.store.tables import ACCOUNTS, HOLDS


@dataclass(frozen=True)
class Refusal:
    """Why a hold was not taken: what the client has and what others already hold."""

    balance: int
    held: int


def acquire_in(
    conn: Connection, hold_id: str, client: str, amount: int, ttl_s: float, *, exists: bool
) -> Refusal | None:
    """Hold `amount` for `client` under `hold_id` (raising an existing hold to it when
    `exists`); None when taken, else the Refusal."""
    now = utcnow()
    locked = select(ACCOUNTS.c.balance).where(ACCOUNTS.c.name == client_account(client))
    balance = int(conn.execute(locked.with_for_update()).scalar() or 0)
    others = select(func.coalesce(func.sum(HOLDS.c.amount), 0)).where(
        HOLDS.c.client == client, HOLDS.c.expires_at > now, HOLDS.c.id != hold_id
    )
    held = int(conn.execute(others).scalar() or 0)
    if balance - held < amount:
        return Refusal(balance, held)
    expires = now + timedelta(seconds=ttl_s)
    if exists:
        conn.execute(
            update(HOLDS).where(HOLDS.c.id == hold_id).values(amount=amount, expires_at=expires)
        )
    else:
        conn.execute(
            insert(HOLDS).values(
                id=hold_id, client=client, amount=amount, expires_at=expires, created_at=now
            )
        )
    return None


def release_in(conn: Connection, hold_id: str) -> None:
    conn.execute(delete(HOLDS).where(HOLDS.c.id == hold_id))


def purge_expired_in(conn: Connection) -> int:
    """Drop holds left by replicas that died mid-request (they no longer count anyway)."""
    return int(conn.execute(delete(HOLDS).where(HOLDS.c.expires_at <= utcnow())).rowcount or 0)


def held_by(conn: Connection, client: str) -> int:
    live = select(func.coalesce(func.sum(HOLDS.c.amount), 0)).where(
        HOLDS.c.client == client, HOLDS.c.expires_at > utcnow()
    )
    return int(conn.execute(live).scalar() or 0)
