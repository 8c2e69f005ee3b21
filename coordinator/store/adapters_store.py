"""Registered LoRA adapters: their archives by hash, written with an audit-log entry."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select

from coordinator.store import audit_store
from coordinator.store.db import for_writes, writers_turn
from coordinator.store.models import utcnow
from coordinator.store.tables import ADAPTERS

_LISTED = (ADAPTERS.c.sha256, ADAPTERS.c.name, ADAPTERS.c.base_model, ADAPTERS.c.size_bytes,
           ADAPTERS.c.created_at)  # fmt: skip


def _card(row: Any) -> dict[str, Any]:
    return {"sha256": row.sha256, "name": row.name, "base_model": row.base_model,
            "size_bytes": row.size_bytes, "created_at": row.created_at.isoformat()}  # fmt: skip


def add(
    engine: Engine, *, sha256: str, name: str, base_model: str, archive: bytes, actor: str
) -> tuple[dict[str, Any], bool]:
    """Register an adapter; (its card, whether it is new). The same bytes twice are one."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        found = conn.execute(select(*_LISTED).where(ADAPTERS.c.sha256 == sha256)).first()
        if found is not None:
            return _card(found), False
        row = {"sha256": sha256, "name": name, "base_model": base_model,
               "size_bytes": len(archive), "created_at": utcnow()}  # fmt: skip
        conn.execute(insert(ADAPTERS).values(archive=archive, **row))
        audit_store.append(conn, actor, "adapter.register", sha256, name=name,
                           base_model=base_model, size_bytes=len(archive))  # fmt: skip
        return _card(conn.execute(select(*_LISTED).where(ADAPTERS.c.sha256 == sha256)).one()), True


def listed(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [_card(r) for r in conn.execute(select(*_LISTED).order_by(ADAPTERS.c.created_at))]


def card(engine: Engine, sha256: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(*_LISTED).where(ADAPTERS.c.sha256 == sha256)).first()
        return _card(row) if row is not None else None


def archive(engine: Engine, sha256: str) -> bytes | None:
    with engine.connect() as conn:
        data = conn.execute(
            select(ADAPTERS.c.archive).where(ADAPTERS.c.sha256 == sha256)
        ).scalar_one_or_none()
        return bytes(data) if data is not None else None
