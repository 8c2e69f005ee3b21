"""Payout epochs for the operator: close one (signed statements per provider), list them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from billing.payouts import SignedStatement
from coordinator.store import audit_store, payouts_store
from coordinator.store.models import MeteringMismatch
from protocol.identity import Identity

MISMATCHES = MeteringMismatch.__table__  # type: ignore[attr-defined]


class Payouts:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self._engine = engine
        self._identity = identity

    def close(self, actor: str) -> list[SignedStatement]:
        """Blocking (database work): call it from a thread on the event loop."""
        return payouts_store.close_epoch(self._engine, self._identity, actor)

    def epochs(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            return payouts_store.epochs(conn)

    def statements(self, epoch: int | None = None) -> list[SignedStatement]:
        with self._engine.connect() as conn:
            return payouts_store.statements(conn, epoch)

    def audit_events(self, limit: int) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            return audit_store.events(conn, limit)

    def mismatches(self, limit: int) -> list[dict[str, Any]]:
        query = select(MISMATCHES).order_by(MISMATCHES.c.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [
                {**row._asdict(), "created_at": row.created_at.isoformat()}
                for row in conn.execute(query)
            ]
