"""Countersigned receipts, kept as the exact signed bytes."""

from __future__ import annotations

from sqlmodel import Session

from coordinator.store.models import StoredReceipt


def get(session: Session, request_id: str) -> StoredReceipt | None:
    return session.get(StoredReceipt, request_id)
