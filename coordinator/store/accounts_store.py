"""Client accounts for the accounts service: API keys, balances and audited deposits, each
call its own database transaction on the engine it is given."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from billing.errors import DuplicateTransaction
from billing.ledger import Transaction
from coordinator.store import audit_store, keys_store, ledger_store
from coordinator.store.db import for_writes
from coordinator.store.models import ApiKey


def find_active_key(engine: Engine, secret: str) -> ApiKey | None:
    """The unrevoked key whose secret this is, or None."""
    with Session(engine) as session:
        return keys_store.find_active(session, secret)


def create_key(
    engine: Engine, client: str, rpm: int | None = None, tpm: int | None = None
) -> tuple[str, ApiKey]:
    """A new key for `client`: the secret (shown once, never stored) and its row."""
    with Session(for_writes(engine)) as session:
        return keys_store.create_key(session, client, rpm, tpm)


def list_keys(engine: Engine, client: str | None = None) -> list[ApiKey]:
    with Session(engine) as session:
        return keys_store.list_keys(session, client)


def revoke_key(engine: Engine, key_id: int) -> ApiKey | None:
    with Session(for_writes(engine)) as session:
        return keys_store.revoke(session, key_id)


def post_audited(
    engine: Engine, tx: Transaction, actor: str, action: str, subject: str, **detail: Any
) -> bool:
    """Post `tx` and its audit event in one database transaction; False (nothing written) if
    its id was posted before."""
    with for_writes(engine).connect() as conn, conn.begin() as outer:
        try:
            ledger_store.post_in(conn, tx)
        except DuplicateTransaction:
            outer.rollback()
            return False
        audit_store.append(conn, actor, action, subject, **detail)
    return True


def audit(engine: Engine, actor: str, action: str, subject: str, **detail: Any) -> None:
    """Record one admin action in its own database transaction."""
    with for_writes(engine).begin() as conn:
        audit_store.append(conn, actor, action, subject, **detail)


def balance(engine: Engine, account: str) -> int:
    with Session(engine) as session:
        return ledger_store.balance(session, account)


def balances(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return ledger_store.balances(session)
