"""Metering mismatches (a worker claimed more tokens than the coordinator's recount), as the
operator lists them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from coordinator.store.tables import MISMATCHES


def latest(engine: Engine, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` mismatches first, every column (the time as ISO 8601)."""
    query = select(MISMATCHES).order_by(MISMATCHES.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [
            {**row._asdict(), "created_at": row.created_at.isoformat()}
            for row in conn.execute(query)
        ]
