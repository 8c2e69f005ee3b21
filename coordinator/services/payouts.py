"""Payout epochs for the operator: close one (signed statements per provider), list them."""

from __future__ import annotations

from typing import Any

from billing.payouts import SignedStatement
from coordinator.store import audit_store, mismatches_store, payouts_store
from coordinator.store.db import Engine
from protocol.identity import Identity


class Payouts:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self._engine = engine
        self._identity = identity

    def close(self, actor: str) -> list[SignedStatement]:
        """Blocking (database work): call it from a thread on the event loop."""
        return payouts_store.close_epoch(self._engine, self._identity, actor)

    def epochs(self) -> list[dict[str, Any]]:
        return payouts_store.all_epochs(self._engine)

    def statements(self, epoch: int | None = None) -> list[SignedStatement]:
        return payouts_store.signed_statements(self._engine, epoch)

    def audit_events(self, limit: int) -> list[dict[str, Any]]:
        return audit_store.latest(self._engine, limit)

    def mismatches(self, limit: int) -> list[dict[str, Any]]:
        return mismatches_store.latest(self._engine, limit)
