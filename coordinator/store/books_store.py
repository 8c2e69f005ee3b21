"""One consistent read of everything the ledger audit replays: balances, postings, receipts,
signed statements, staged settlements, and the admin audit chain's own check."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session

from billing.ledger import PaidReceipt, Posting, Transaction
from billing.payouts import SignedStatement
from coordinator.store import audit_store, ledger_store, outbox_store, payouts_store, receipts_store


@dataclass(frozen=True)
class Books:
    balances: dict[str, int]
    postings: dict[str, list[Posting]]  # by transaction id
    receipts: list[PaidReceipt]
    statements: list[SignedStatement]
    staged: list[Transaction]  # settlements committed but not yet posted
    chain_problems: list[str]  # what is wrong with the admin audit log's hash chain


def snapshot(engine: Engine) -> Books:
    """Read the books in one database transaction (one snapshot)."""
    with Session(engine) as session, session.begin():
        conn = session.connection()
        return Books(
            balances=ledger_store.balances(session),
            postings=ledger_store.postings_by_transaction(session),
            receipts=receipts_store.paid(session),
            statements=payouts_store.statements(conn),
            staged=outbox_store.pending(conn),
            chain_problems=audit_store.check_chain(conn),
        )
