"""Posting ledger transactions atomically: all postings and balance updates, or nothing."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from billing.errors import DuplicateTransaction
from billing.ledger import Posting, Transaction, account_kind, apply
from coordinator.store.models import Account, LedgerPosting, LedgerTransaction


def _locked_accounts(session: Session, names: list[str]) -> dict[str, Account]:
    query = select(Account).where(col(Account.name).in_(names)).with_for_update()
    return {a.name: a for a in session.exec(query)}


def add_postings(session: Session, tx: Transaction) -> None:
    """Apply `tx` inside the caller's transaction (locks the touched accounts on PostgreSQL).

    Raises DuplicateTransaction if its id was posted before, InsufficientFunds if it would
    overdraw an account; the caller's transaction must then be rolled back.
    """
    if session.get(LedgerTransaction, tx.txid) is not None:
        raise DuplicateTransaction(tx.txid)
    names = sorted({p.account for p in tx.postings})  # fixed order: no lock-order deadlocks
    accounts = _locked_accounts(session, names)
    for name in names:
        if name not in accounts:
            accounts[name] = Account(name=name, kind=account_kind(name).value, balance=0)
            session.add(accounts[name])
    session.flush()
    after = apply({n: a.balance for n, a in accounts.items()}, frozenset(), tx)
    session.add(LedgerTransaction(txid=tx.txid, kind=tx.kind, memo=tx.memo))
    session.flush()
    for p in tx.postings:
        session.add(LedgerPosting(txid=tx.txid, account=p.account, amount=p.amount))
    for name, balance in after.items():
        accounts[name].balance = balance
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent writer posted the same id first
        raise DuplicateTransaction(tx.txid) from exc


def post(session: Session, tx: Transaction) -> bool:
    """Post `tx` in its own database transaction. False if it was already posted."""
    try:
        add_postings(session, tx)
        session.commit()
    except DuplicateTransaction:
        session.rollback()
        return False
    except Exception:
        session.rollback()
        raise
    return True


def balance(session: Session, account: str) -> int:
    row = session.get(Account, account)
    return row.balance if row else 0


def balances(session: Session) -> dict[str, int]:
    return {a.name: a.balance for a in session.exec(select(Account))}


def postings_by_transaction(session: Session) -> dict[str, list[Posting]]:
    """Every transaction's postings, as stored (for audits: nothing is re-validated here)."""
    out: dict[str, list[Posting]] = {t.txid: [] for t in session.exec(select(LedgerTransaction))}
    for p in session.exec(select(LedgerPosting).order_by(col(LedgerPosting.id))):
        out.setdefault(p.txid, []).append(Posting(p.account, p.amount))
    return out
