"""The ledger audit: replay every stored posting, receipt, statement and admin action."""

from __future__ import annotations

from billing.ledger import check_invariants, check_receipts
from billing.payouts import check_statements, verify_statement
from coordinator.store import books_store
from coordinator.store.db import Engine


def audit_ledger(engine: Engine) -> list[str]:
    """Every problem found (empty = the books are sound). Reads one consistent snapshot."""
    books = books_store.snapshot(engine)
    problems = list(books.chain_problems)
    statements = []
    for one in books.statements:
        try:
            statements.append(verify_statement(one))
        except Exception as exc:
            problems.append(f"a stored payout statement does not verify: {exc}")
    # a staged settlement is posted at the next start-up; its receipts are not yet in postings
    staged_ids = {tx.txid[4:] for tx in books.staged if tx.txid.startswith("req:")}
    receipts = [r for r in books.receipts if r.request_id not in staged_ids]
    problems += [f"settlement {tx.txid} is staged but not posted" for tx in books.staged]
    return (
        check_invariants(books.balances, books.postings)
        + check_receipts(books.postings, receipts)
        + check_statements(books.postings, statements)
        + problems
    )
