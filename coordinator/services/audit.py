"""The ledger audit: replay every stored posting and receipt against the stored balances."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session

from billing.ledger import check_invariants, check_receipts
from coordinator.store import ledger_store, receipts_store


def audit_ledger(engine: Engine) -> list[str]:
    """Every problem found (empty = the books are sound). Reads one consistent snapshot."""
    with Session(engine) as session, session.begin():
        balances = ledger_store.balances(session)
        postings = ledger_store.postings_by_transaction(session)
        receipts = receipts_store.paid(session)
    return check_invariants(balances, postings) + check_receipts(postings, receipts)
