"""The ledger audit: replay every stored posting, receipt, statement and admin action."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session

from billing.ledger import check_invariants, check_receipts
from billing.payouts import check_statements, verify_statement
from coordinator.store import audit_store, ledger_store, outbox_store, payouts_store, receipts_store


def audit_ledger(engine: Engine) -> list[str]:
    """Every problem found (empty = the books are sound). Reads one consistent snapshot."""
    problems: list[str] = []
    with Session(engine) as session, session.begin():
        conn = session.connection()
        balances = ledger_store.balances(session)
        postings = ledger_store.postings_by_transaction(session)
        receipts = receipts_store.paid(session)
        signed = payouts_store.statements(conn)
        staged = outbox_store.pending(conn)
        problems += audit_store.check_chain(conn)
    statements = []
    for one in signed:
        try:
            statements.append(verify_statement(one))
        except Exception as exc:
            problems.append(f"a stored payout statement does not verify: {exc}")
    # a staged settlement is posted at the next start-up; its receipts are not yet in postings
    staged_ids = {tx.txid[4:] for tx in staged if tx.txid.startswith("req:")}
    receipts = [r for r in receipts if r.request_id not in staged_ids]
    problems += [f"settlement {tx.txid} is staged but not posted" for tx in staged]
    return (
        check_invariants(balances, postings)
        + check_receipts(postings, receipts)
        + check_statements(postings, statements)
        + problems
    )
