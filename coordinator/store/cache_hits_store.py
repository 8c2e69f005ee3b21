"""Requests answered from the response cache: each one's signed statement, and its charge
posted in the same transaction (a hit is billed once or not at all)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from billing.ledger import Transaction
from coordinator.store import ledger_store
from coordinator.store.models import utcnow
from coordinator.store.tables import CACHE_HITS


def record(conn: Connection, document: dict[str, Any], client: str, tx: Transaction | None) -> None:
    """Store a hit's receipt and post its charge (raises InsufficientFunds, writing
    nothing, when the client cannot pay it)."""
    if tx is not None:
        ledger_store.post_once_in(conn, tx)
    conn.execute(insert(CACHE_HITS).values(
        request_id=document["request_id"], client=client,
        source_request_id=document["source_request_id"], amount=document["amount_total"],
        document=json.dumps(document), created_at=utcnow(),
    ))  # fmt: skip


def document(engine: Engine, request_id: str, client: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(CACHE_HITS.c.document).where(
                CACHE_HITS.c.request_id == request_id, CACHE_HITS.c.client == client
            )
        ).scalar_one_or_none()
    if row is None:
        return None
    value: dict[str, Any] = json.loads(row)
    return value
