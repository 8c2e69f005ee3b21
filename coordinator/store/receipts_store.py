"""Countersigned receipts, kept as the exact signed bytes, and the segments a dead worker
delivered unsigned (charged to the client, paid to nobody)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, Engine, insert
from sqlmodel import Session, col, select

from billing.errors import InsufficientFunds
from billing.ledger import PaidReceipt, Transaction, client_account
from coordinator.store import ledger_store, outbox_store
from coordinator.store.db import insert_ignoring_duplicates
from coordinator.store.models import StoredReceipt, UnsignedSegment, utcnow
from coordinator.store.tables import MISMATCHES, POSTINGS, RECEIPTS, UNSIGNED

log = logging.getLogger("agora.coordinator.ledger")


def get(session: Session, request_id: str) -> StoredReceipt | None:
    return session.get(StoredReceipt, request_id)


def segments(session: Session, parent_id: str) -> list[StoredReceipt]:
    """Every receipt of one client request, first worker first."""
    query = select(StoredReceipt).where(StoredReceipt.parent_id == parent_id)
    return list(session.exec(query.order_by(col(StoredReceipt.segment))))


def paid(session: Session) -> list[PaidReceipt]:
    """Every stored receipt as what it paid, for the ledger audit."""
    return [
        PaidReceipt(r.parent_id or r.request_id, r.worker_id, r.amount_total)
        for r in session.exec(select(StoredReceipt))
    ]


def stage_settlement(
    conn: Connection,
    receipts: list[dict[str, Any]],
    unsigned: list[dict[str, Any]],
    mismatches: list[dict[str, Any]],
    tx: Transaction,
) -> None:
    """A request's countersigned receipts, unsigned segments, metering mismatches and staged
    ledger posting, in the caller's transaction (see outbox_store: posted by a second one)."""
    _write_records(conn, receipts, unsigned, mismatches)
    outbox_store.stage(conn, tx)


def _write_records(
    conn: Connection,
    receipts: list[dict[str, Any]],
    unsigned: list[dict[str, Any]],
    mismatches: list[dict[str, Any]],
) -> None:
    now = utcnow()
    if receipts:
        insert_ignoring_duplicates(conn, RECEIPTS, [{**r, "created_at": now} for r in receipts])
    if unsigned:
        insert_ignoring_duplicates(conn, UNSIGNED, [{**u, "created_at": now} for u in unsigned])
    if mismatches:
        conn.execute(insert(MISMATCHES), [{**m, "created_at": now} for m in mismatches])


def record_settlement(
    conn: Connection,
    receipts: list[dict[str, Any]],
    unsigned: list[dict[str, Any]],
    mismatches: list[dict[str, Any]],
    tx: Transaction,
) -> None:
    """A request's receipts and its ledger posting in one database transaction (one commit
    per request, not `stage_settlement`'s two). A posting that fails (under credit holds it
    cannot) is staged instead, for start-up reconciliation, and the receipts are kept."""
    _write_records(conn, receipts, unsigned, mismatches)
    try:
        ledger_store.post_once_in(conn, tx)
    except InsufficientFunds:
        log.error("settlement %s cannot be posted: it would overdraw an account", tx.txid)
        outbox_store.stage(conn, tx)


def client_charge(conn: Connection, request_id: str, client: str) -> int:
    """What the client paid for a request (0 if nothing was posted)."""
    amount = conn.execute(
        select(POSTINGS.c.amount).where(
            POSTINGS.c.txid == f"req:{request_id}",
            POSTINGS.c.account == client_account(client),
        )
    ).scalar()
    return -int(amount or 0)


def request_receipts(
    engine: Engine, request_id: str
) -> tuple[list[StoredReceipt], list[UnsignedSegment], int] | None:
    """Every receipt of the client request that `request_id` (or one of its segments'
    ids) belongs to, first segment first, its unsigned segments, and what the client paid."""
    with Session(engine) as session:
        first = get(session, request_id)
        parent = first.parent_id if first is not None and first.parent_id else request_id
        rows = segments(session, parent)
        if not rows:
            return None
        query = select(UnsignedSegment).where(UnsignedSegment.parent_id == parent)
        unsigned = list(session.exec(query.order_by(col(UnsignedSegment.segment))))
        return rows, unsigned, client_charge(session.connection(), parent, rows[0].client)
