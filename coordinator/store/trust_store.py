"""Trust records, and what proven fraud does to the books, in one database transaction:
the worker is quarantined, its unpaid earnings are clawed back, its bond is slashed, and every
client it served in the open payout epoch (and the request the fraud was proven on) is
refunded what it paid. Transaction ids make each step happen at most once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from billing.ledger import (
    NETWORK_REFUNDS,
    NETWORK_SLASHED,
    Posting,
    Transaction,
    bond_account,
    client_account,
    provider_account,
)
from coordinator.store import ledger_store
from coordinator.store.models import utcnow
from coordinator.store.tables import EVENTS, POSTINGS, QUARANTINE, RECEIPTS
from coordinator.store.writer import LedgerWriter


@dataclass(frozen=True)
class FraudOutcome:
    refunded: dict[str, int]  # client -> micro-units returned
    clawed_back: int
    slashed: int


def record_events(conn: Connection, rows: list[dict[str, str]]) -> None:
    now = utcnow()
    conn.execute(insert(EVENTS), [{**row, "at": now} for row in rows])


def quarantined(conn: Connection) -> dict[str, str]:
    return {r.node_id: r.reason for r in conn.execute(select(QUARANTINE))}


def recent_events(conn: Connection, since: float) -> list[tuple[str, str, float]]:
    """(node, outcome, unix time) of every event since `since`, oldest first."""
    query = (
        select(EVENTS.c.node_id, EVENTS.c.outcome, EVENTS.c.at)
        .where(EVENTS.c.at >= datetime.fromtimestamp(since, UTC))
        .order_by(EVENTS.c.id)
    )
    return [(r.node_id, r.outcome, _unix(r.at)) for r in conn.execute(query)]


def events(
    conn: Connection, node_id: str | None, outcomes: Sequence[str], limit: int
) -> list[dict[str, Any]]:
    """The newest evidence first, optionally for one worker and some outcomes (none: all)."""
    query = select(EVENTS).order_by(EVENTS.c.id.desc()).limit(limit)
    if node_id:
        query = query.where(EVENTS.c.node_id == node_id)
    if outcomes:
        query = query.where(EVENTS.c.outcome.in_(list(outcomes)))
    return [
        {"node_id": r.node_id, "outcome": r.outcome, "request_id": r.request_id,
         "detail": r.detail, "at": _unix(r.at)}
        for r in conn.execute(query)
    ]  # fmt: skip


def event_counts(conn: Connection, node_id: str | None) -> dict[str, int]:
    """How many of each outcome were recorded (for one worker, or for all)."""
    query = select(EVENTS.c.outcome, func.count()).group_by(EVENTS.c.outcome)
    if node_id:
        query = query.where(EVENTS.c.node_id == node_id)
    return {str(outcome): int(count) for outcome, count in conn.execute(query)}


def load(engine: Engine, since: float) -> tuple[dict[str, str], list[tuple[str, str, float]]]:
    """The quarantine list and every event since `since` (`quarantined`, `recent_events`),
    read on one connection."""
    with engine.connect() as conn:
        return quarantined(conn), recent_events(conn, since)


def evidence(
    engine: Engine, node_id: str | None, outcomes: Sequence[str], limit: int
) -> dict[str, Any]:
    """`events` and `event_counts`, read on one connection."""
    with engine.connect() as conn:
        return {
            "events": events(conn, node_id, outcomes, limit),
            "counts": event_counts(conn, node_id),
        }


def latest_events(
    engine: Engine, node_id: str | None, outcomes: Sequence[str], limit: int
) -> list[dict[str, Any]]:
    """`events`, on a connection of its own."""
    with engine.connect() as conn:
        return events(conn, node_id, outcomes, limit)


async def save_events(writer: LedgerWriter, rows: list[dict[str, str]]) -> None:
    """`record_events` through the ledger writer (committed with its next batch)."""
    await writer.submit(lambda conn: record_events(conn, rows))


async def punish(
    writer: LedgerWriter,
    node_id: str,
    request_id: str,
    reason: str,
    slash_amount: int,
    *,
    proven: bool,
) -> FraudOutcome:
    """Through the ledger writer: `punish_fraud` if the fraud is proven, else
    `quarantine_only`."""
    outcome: FraudOutcome = await writer.submit(
        lambda conn: (
            punish_fraud(conn, node_id, request_id, reason, slash_amount)
            if proven
            else quarantine_only(conn, node_id, request_id, reason)
        )
    )
    return outcome


def _unix(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _client_paid(conn: Connection, request_id: str) -> tuple[str, int] | None:
    for account, amount in conn.execute(
        select(POSTINGS.c.account, POSTINGS.c.amount).where(POSTINGS.c.txid == f"req:{request_id}")
    ):
        if account.startswith("client:") and amount < 0:
            return account.split(":", 1)[1], -int(amount)
    return None


def quarantine_only(conn: Connection, node_id: str, request_id: str, reason: str) -> FraudOutcome:
    """Stop routing to a worker whose record collapsed, without claiming proof of fraud."""
    _quarantine(conn, node_id, request_id, reason)
    return FraudOutcome({}, 0, 0)


def _quarantine(conn: Connection, node_id: str, request_id: str, reason: str) -> bool:
    """True if newly quarantined."""
    if conn.execute(select(QUARANTINE.c.node_id).where(QUARANTINE.c.node_id == node_id)).first():
        return False
    conn.execute(
        insert(QUARANTINE).values(
            node_id=node_id, reason=reason[:500], request_id=request_id, at=utcnow()
        )
    )
    return True


def punish_fraud(
    conn: Connection, node_id: str, request_id: str, reason: str, slash_amount: int
) -> FraudOutcome:
    _quarantine(conn, node_id, request_id, reason)
    unpaid = conn.execute(
        select(RECEIPTS.c.parent_id).where(
            RECEIPTS.c.worker_id == node_id, RECEIPTS.c.epoch_id.is_(None)
        )
    ).scalars()
    requests = sorted({*unpaid, request_id.split("~", 1)[0]})
    refunded: dict[str, int] = {}
    for rid in requests:
        paid = _client_paid(conn, rid)
        if paid is None:
            continue
        client, amount = paid
        refund = Transaction(
            f"refund:{rid}", "refund",
            (Posting(client_account(client), amount), Posting(NETWORK_REFUNDS, -amount)),
            memo=f"fraud by {node_id}",
        )  # fmt: skip
        if ledger_store.post_once_in(conn, refund):
            refunded[client] = refunded.get(client, 0) + amount
    earned = ledger_store.balance_of(conn, provider_account(node_id))
    clawed = 0
    if earned > 0:
        clawback = Transaction(
            f"clawback:{node_id}:{request_id}", "clawback",
            (Posting(provider_account(node_id), -earned), Posting(NETWORK_REFUNDS, earned)),
        )  # fmt: skip
        clawed = earned if ledger_store.post_once_in(conn, clawback) else 0
    bond = ledger_store.balance_of(conn, bond_account(node_id))
    slashed = min(bond, slash_amount)
    if slashed > 0:  # once per worker, however many frauds are proven against it
        slash = Transaction(
            f"slash:{node_id}", "slash",
            (Posting(bond_account(node_id), -slashed), Posting(NETWORK_SLASHED, slashed)),
            memo=reason[:200],
        )  # fmt: skip
        slashed = slashed if ledger_store.post_once_in(conn, slash) else 0
    else:
        slashed = 0
    return FraudOutcome(refunded, clawed, slashed)
