"""Payout epochs: closing one moves every provider's earnings to "paid" and writes a signed
statement per provider, all in one database transaction (serializable on PostgreSQL, under
SQLite's single write lock), so a settlement racing the close is either in it or in the next."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import OperationalError

from billing.ledger import AccountKind, payout
from billing.payouts import SignedStatement, Statement, sign_statement
from coordinator.store import audit_store, ledger_store, outbox_store
from coordinator.store.db import for_writes
from coordinator.store.models import utcnow
from coordinator.store.tables import ACCOUNTS, EPOCHS, RECEIPTS, STATEMENTS
from protocol.identity import Identity

_RETRIES = 8


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def open_epoch(conn: Connection) -> tuple[int, datetime]:
    """The epoch now collecting earnings (the first one is opened on demand)."""
    row = conn.execute(
        select(EPOCHS.c.id, EPOCHS.c.opened_at)
        .where(EPOCHS.c.closed_at.is_(None))
        .order_by(EPOCHS.c.id.desc())
        .limit(1)
    ).first()
    if row is not None:
        return int(row.id), row.opened_at
    now = utcnow()
    epoch = conn.execute(insert(EPOCHS).values(opened_at=now)).inserted_primary_key
    assert epoch is not None
    return int(epoch[0]), now


def _close_in(conn: Connection, identity: Identity, actor: str) -> list[SignedStatement]:
    # take the write lock first (SQLite) so what is read below cannot change under us
    epoch, opened_at = open_epoch(conn)
    now = utcnow()
    closed = conn.execute(
        update(EPOCHS).where(EPOCHS.c.id == epoch, EPOCHS.c.closed_at.is_(None))
        .values(closed_at=now)
    ).rowcount  # fmt: skip
    if closed != 1:
        raise RuntimeError(f"epoch {epoch} was closed by someone else")
    for tx in outbox_store.pending(conn):  # staged earnings belong to this epoch too
        outbox_store.post_staged(conn, tx)
    earned: dict[str, dict[str, int]] = defaultdict(dict)
    counts: dict[str, int] = defaultdict(int)
    per_model = select(
        RECEIPTS.c.worker_id, RECEIPTS.c.model, func.count(), func.sum(RECEIPTS.c.amount_total)
    )
    for row in conn.execute(
        per_model.where(RECEIPTS.c.epoch_id.is_(None))
        .group_by(RECEIPTS.c.worker_id, RECEIPTS.c.model)
    ):  # fmt: skip
        earned[row[0]][row[1]] = int(row[3] or 0)
        counts[row[0]] += int(row[2])
    conn.execute(update(RECEIPTS).where(RECEIPTS.c.epoch_id.is_(None)).values(epoch_id=epoch))
    owed = conn.execute(
        select(ACCOUNTS.c.name, ACCOUNTS.c.balance)
        .where(ACCOUNTS.c.kind == AccountKind.PROVIDER.value, ACCOUNTS.c.balance > 0)
        .order_by(ACCOUNTS.c.name)
    ).all()
    signed: list[SignedStatement] = []
    for name, balance in owed:
        node = name.split(":", 1)[1]
        statement = Statement(
            epoch=epoch, node_id=node, period_start=_iso(opened_at), period_end=_iso(now),
            amount=int(balance), receipts=counts.get(node, 0),
            by_model=dict(sorted(earned.get(node, {}).items())), coordinator_id=identity.node_id,
        )  # fmt: skip
        ledger_store.post_in(conn, payout(epoch, node, int(balance)))
        one = sign_statement(identity, statement)
        conn.execute(
            insert(STATEMENTS).values(
                epoch_id=epoch, node_id=node, amount=int(balance), body=one.body,
                coordinator_id=identity.node_id, signature=one.signature,
            )
        )  # fmt: skip
        signed.append(one)
    conn.execute(insert(EPOCHS).values(opened_at=now))
    audit_store.append(
        conn, actor, "payouts.close", f"epoch {epoch}",
        providers=len(signed), total=sum(s.statement.amount for s in signed),
    )  # fmt: skip
    return signed


def close_epoch(
    engine: Engine, identity: Identity, actor: str = "operator"
) -> list[SignedStatement]:
    """Close the open epoch; its signed statements (one per provider with earnings)."""
    for attempt in range(_RETRIES):
        options = {"isolation_level": "SERIALIZABLE"} if engine.dialect.name == "postgresql" else {}
        try:
            with for_writes(engine).connect().execution_options(**options) as conn, conn.begin():
                return _close_in(conn, identity, actor)
        except OperationalError as exc:  # a serialization failure: the close is retried whole
            if "could not serialize" not in str(exc) or attempt == _RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def statements(conn: Connection, epoch: int | None = None) -> list[SignedStatement]:
    query = select(STATEMENTS.c.body, STATEMENTS.c.signature).order_by(STATEMENTS.c.id)
    if epoch is not None:
        query = query.where(STATEMENTS.c.epoch_id == epoch)
    return [SignedStatement(r.body, r.signature) for r in conn.execute(query)]


def epochs(conn: Connection) -> list[dict[str, object]]:
    rows = conn.execute(select(EPOCHS).order_by(EPOCHS.c.id)).all()
    totals = dict(
        conn.execute(
            select(STATEMENTS.c.epoch_id, func.sum(STATEMENTS.c.amount)).group_by(
                STATEMENTS.c.epoch_id
            )
        ).all()
    )
    return [
        {"epoch": r.id, "opened_at": _iso(r.opened_at),
         "closed_at": _iso(r.closed_at) if r.closed_at else None,
         "paid": int(totals.get(r.id) or 0)}
        for r in rows
    ]  # fmt: skip


def all_epochs(engine: Engine) -> list[dict[str, object]]:
    """`epochs`, on a connection of its own."""
    with engine.connect() as conn:
        return epochs(conn)


def signed_statements(engine: Engine, epoch: int | None = None) -> list[SignedStatement]:
    """`statements`, on a connection of its own."""
    with engine.connect() as conn:
        return statements(conn, epoch)
