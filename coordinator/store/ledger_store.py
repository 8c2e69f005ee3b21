"""Posting ledger transactions atomically: every posting and balance change, or nothing.

Written with SQLAlchemy Core on a Connection (a settlement is a handful of statements, not an
ORM unit of work). The non-negative rule for client and provider accounts is enforced by the
UPDATE itself (`... WHERE balance + :amount >= 0`), so concurrent writers on PostgreSQL cannot
overdraw an account between a read and a write.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col
from sqlmodel import select as select_rows

from billing.errors import DuplicateTransaction, InsufficientFunds
from billing.ledger import MAY_GO_NEGATIVE, Posting, Transaction, account_kind
from coordinator.store.db import insert_ignoring_duplicates
from coordinator.store.models import Account, LedgerPosting, LedgerTransaction, utcnow
from coordinator.store.tables import ACCOUNTS, POSTINGS, TRANSACTIONS

_NEW_TRANSACTION = insert(TRANSACTIONS)
_NEW_POSTINGS = insert(POSTINGS)
_MOVE = (  # statements built once: SQLAlchemy reuses their compiled form
    update(ACCOUNTS)
    .where(ACCOUNTS.c.name == bindparam("account"))
    .values(balance=ACCOUNTS.c.balance + bindparam("amount"))
)
_MOVE_NOT_BELOW_ZERO = _MOVE.where(ACCOUNTS.c.balance + bindparam("amount") >= 0)


def post_in(conn: Connection, tx: Transaction) -> None:
    """Apply `tx` inside the caller's transaction. Raises DuplicateTransaction if its id was
    posted before, InsufficientFunds if it would overdraw an account; the caller must then roll
    back (a savepoint is enough)."""
    try:
        conn.execute(
            _NEW_TRANSACTION, {"txid": tx.txid, "kind": tx.kind, "memo": tx.memo,
                               "created_at": utcnow()}
        )  # fmt: skip
    except IntegrityError as exc:
        raise DuplicateTransaction(tx.txid) from exc
    postings = sorted(tx.postings, key=lambda p: p.account)  # one lock order: no deadlocks
    insert_ignoring_duplicates(
        conn,
        ACCOUNTS,
        [
            {"name": p.account, "kind": account_kind(p.account).value, "balance": 0,
             "created_at": utcnow()}
            for p in postings
        ],
    )  # fmt: skip
    for p in postings:
        guarded = account_kind(p.account) not in MAY_GO_NEGATIVE
        statement = _MOVE_NOT_BELOW_ZERO if guarded else _MOVE
        result = conn.execute(statement, {"account": p.account, "amount": p.amount})
        if result.rowcount != 1:
            raise InsufficientFunds(f"{p.account} cannot take {p.amount}")
    conn.execute(
        _NEW_POSTINGS,
        [{"txid": tx.txid, "account": p.account, "amount": p.amount} for p in postings],
    )


def post_once_in(conn: Connection, tx: Transaction) -> bool:
    """Post `tx` inside the caller's transaction unless its id was posted before (False then;
    its savepoint is rolled back, the caller's transaction goes on). On any other error the
    savepoint is rolled back too and the error raised: the caller's transaction is intact."""
    savepoint = conn.begin_nested()
    try:
        post_in(conn, tx)
    except DuplicateTransaction:
        savepoint.rollback()
        return False
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return True


def post(session: Session, tx: Transaction) -> bool:
    """Post `tx` in its own database transaction. False if it was already posted."""
    conn = session.connection()
    try:
        post_in(conn, tx)
        session.commit()
    except DuplicateTransaction:
        session.rollback()
        return False
    except Exception:
        session.rollback()
        raise
    return True


def balance_of(conn: Connection, account: str) -> int:
    value = conn.execute(select(ACCOUNTS.c.balance).where(ACCOUNTS.c.name == account)).scalar()
    return int(value or 0)


def balance(session: Session, account: str) -> int:
    return balance_of(session.connection(), account)


def balances(session: Session) -> dict[str, int]:
    return {a.name: a.balance for a in session.exec(select_rows(Account))}


def postings_by_transaction(session: Session) -> dict[str, list[Posting]]:
    """Every transaction's postings, as stored (for audits: nothing is re-validated here)."""
    out: dict[str, list[Posting]] = {
        t.txid: [] for t in session.exec(select_rows(LedgerTransaction))
    }
    for p in session.exec(select_rows(LedgerPosting).order_by(col(LedgerPosting.id))):
        out.setdefault(p.txid, []).append(Posting(p.account, p.amount))
    return out


def accounts_named(session: Session, names: Sequence[str]) -> dict[str, int]:
    query = select_rows(Account).where(col(Account.name).in_(list(names)))
    return {a.name: a.balance for a in session.exec(query)}
