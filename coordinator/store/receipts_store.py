"""Countersigned receipts, kept as the exact signed bytes."""

from __future__ import annotations

from sqlmodel import Session, col, select

from billing.ledger import PaidReceipt
from coordinator.store.models import StoredReceipt


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
