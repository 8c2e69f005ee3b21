"""The settlement outbox: a request's ledger transaction is committed together with its
receipts, then posted in a second transaction that also clears it. A coordinator that dies
between the two finds it here at start-up and posts it (the transaction id makes it once)."""

from __future__ import annotations

import json
import logging

from sqlalchemy import Connection, Engine, delete, select

from billing.errors import InsufficientFunds
from billing.ledger import Transaction, transaction_from_json, transaction_to_json
from coordinator.store import ledger_store
from coordinator.store.db import for_writes, insert_ignoring_duplicates
from coordinator.store.models import utcnow
from coordinator.store.tables import PENDING

log = logging.getLogger("agora.coordinator.ledger")


def stage(conn: Connection, tx: Transaction) -> None:
    """Stage `tx` for posting (once: staging it again is a no-op)."""
    body = json.dumps(transaction_to_json(tx), separators=(",", ":"))
    insert_ignoring_duplicates(
        conn, PENDING, [{"txid": tx.txid, "body": body, "created_at": utcnow()}]
    )


def post_staged(conn: Connection, tx: Transaction) -> bool:
    """Post a staged transaction and clear it; False if it had been posted already."""
    conn.execute(delete(PENDING).where(PENDING.c.txid == tx.txid))
    return ledger_store.post_once_in(conn, tx)


def pending(conn: Connection) -> list[Transaction]:
    rows = conn.execute(select(PENDING.c.body).order_by(PENDING.c.created_at)).scalars()
    return [transaction_from_json(json.loads(body)) for body in rows]


def reconcile(engine: Engine) -> int:
    """Post whatever a previous run staged but never posted; the number posted now."""
    posted = 0
    with for_writes(engine).begin() as conn:
        for tx in pending(conn):
            savepoint = conn.begin_nested()
            try:
                fresh = post_staged(conn, tx)
            except InsufficientFunds:  # cannot happen under holds; keep it for the operator
                savepoint.rollback()
                log.error("staged %s cannot be posted: it would overdraw an account", tx.txid)
                continue
            savepoint.commit()
            if fresh:
                posted += 1
                log.warning("posted %s at start-up (staged before a crash)", tx.txid)
    return posted
