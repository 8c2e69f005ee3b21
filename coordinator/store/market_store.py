"""Read-only aggregates over the books for the dashboards: where the money went, who spent it,
what each provider earned. (The ledger stays the source: nothing here is stored twice.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, func, select

from billing.ledger import EXTERNAL_PAYOUTS, NETWORK_FEES
from billing.payouts import SignedStatement
from coordinator.store.tables import ACCOUNTS, POSTINGS, RECEIPTS, STATEMENTS, TRANSACTIONS

_SPENDING = ("request", "cache_hit")  # what clients pay for answers (a worker's or the cache's)


def _request_postings(kind_prefix: str) -> Any:
    """Sum of postings for answers per account of one kind ("client:", "provider:")."""
    return (
        select(POSTINGS.c.account, func.sum(POSTINGS.c.amount).label("total"))
        .join(TRANSACTIONS, TRANSACTIONS.c.txid == POSTINGS.c.txid)
        .where(TRANSACTIONS.c.kind.in_(_SPENDING), POSTINGS.c.account.like(f"{kind_prefix}%"))
        .group_by(POSTINGS.c.account)
    )


def money(conn: Connection) -> dict[str, int]:
    """Revenue (what clients paid for answers, from workers or the response cache), the
    network's fees, what providers earned, what is paid out and what is still owed to them,
    in micro-units."""
    spent = sum(-int(r.total) for r in conn.execute(_request_postings("client:")))
    earned = sum(int(r.total) for r in conn.execute(_request_postings("provider:")))
    balances = dict(conn.execute(select(ACCOUNTS.c.name, ACCOUNTS.c.balance)).all())
    owed = sum(int(v) for k, v in balances.items() if str(k).startswith("provider:"))
    deposits = sum(int(v) for k, v in balances.items() if str(k).startswith("client:"))
    return {
        "revenue": spent,
        "fees": int(balances.get(NETWORK_FEES, 0)),
        "provider_earnings": earned,
        "paid_out": int(balances.get(EXTERNAL_PAYOUTS, 0)),
        "owed_to_providers": owed,
        "client_balances": deposits,
    }


def top_clients(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """Clients by what they spent on requests, most first, with their balance."""
    spent = _request_postings("client:").order_by(func.sum(POSTINGS.c.amount)).limit(limit)
    rows = conn.execute(spent).all()
    names = [r.account for r in rows]
    balances = dict(
        conn.execute(
            select(ACCOUNTS.c.name, ACCOUNTS.c.balance).where(ACCOUNTS.c.name.in_(names))
        ).all()
    )
    return [
        {"client": r.account.removeprefix("client:"), "spent": -int(r.total),
         "balance": int(balances.get(r.account, 0))}
        for r in rows
    ]  # fmt: skip


def settled_requests(conn: Connection) -> int:
    """Client requests with a stored receipt (continuations count once)."""
    first_segments = select(func.count()).select_from(RECEIPTS).where(RECEIPTS.c.segment == 0)
    return int(conn.execute(first_segments).scalar_one())


def provider_jobs(conn: Connection, node_id: str) -> dict[str, Any]:
    """One provider's receipts: jobs served and what the open epoch has earned, per model."""
    query = (
        select(RECEIPTS.c.model, func.count().label("jobs"),
               func.sum(RECEIPTS.c.amount_total).label("earned"))
        .where(RECEIPTS.c.worker_id == node_id, RECEIPTS.c.epoch_id.is_(None))
        .group_by(RECEIPTS.c.model)
    )  # fmt: skip
    open_epoch = {r.model: {"jobs": int(r.jobs), "earned": int(r.earned or 0)}
                  for r in conn.execute(query)}  # fmt: skip
    served = select(func.count()).select_from(RECEIPTS).where(RECEIPTS.c.worker_id == node_id)
    return {"jobs_served": int(conn.execute(served).scalar_one()), "open_epoch": open_epoch}


def provider_statements(conn: Connection, node_id: str) -> list[dict[str, Any]]:
    """One provider's closed epochs: the signed statements' contents, oldest first."""
    query = (
        select(STATEMENTS.c.body, STATEMENTS.c.signature)
        .where(STATEMENTS.c.node_id == node_id)
        .order_by(STATEMENTS.c.epoch_id)
    )
    out = []
    for row in conn.execute(query):
        statement = SignedStatement(row.body, row.signature).statement
        out.append({"epoch": statement.epoch, "amount": statement.amount,
                    "receipts": statement.receipts, "by_model": statement.by_model,
                    "period_end": statement.period_end})  # fmt: skip
    return out


def overview(engine: Engine, top: int) -> dict[str, Any]:
    """The operator's books, read on one connection: the money, the `top` clients, and how
    many requests were settled."""
    with engine.connect() as conn:
        return {
            "money": money(conn),
            "top_clients": top_clients(conn, top),
            "settled_requests": settled_requests(conn),
        }


def provider_books(engine: Engine, node_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One provider's jobs (`provider_jobs`) and closed epochs (`provider_statements`), read
    on one connection."""
    with engine.connect() as conn:
        return provider_jobs(conn, node_id), provider_statements(conn, node_id)
