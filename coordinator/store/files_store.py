"""Files API metadata (the bytes are on disk, content-addressed: services.batches.files)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select, update

from coordinator.store.db import for_writes, writers_turn
from coordinator.store.tables import FILES

_COLUMNS = (FILES.c.id, FILES.c.client, FILES.c.purpose, FILES.c.filename, FILES.c.size_bytes,
            FILES.c.sha256, FILES.c.lines, FILES.c.created_at)  # fmt: skip


def add(engine: Engine, row: dict[str, Any]) -> None:
    with writers_turn(engine), for_writes(engine).begin() as conn:
        conn.execute(insert(FILES).values(**row, deleted=False))


def get(engine: Engine, file_id: str, client: str) -> dict[str, Any] | None:
    """The client's file (None: no such file, someone else's, or deleted)."""
    with engine.connect() as conn:
        row = conn.execute(select(*_COLUMNS).where(
            FILES.c.id == file_id, FILES.c.client == client, FILES.c.deleted.is_(False)
        )).first()  # fmt: skip
    return dict(row._mapping) if row is not None else None


def listed(
    engine: Engine, client: str, purpose: str | None, limit: int, after: str | None
) -> list[dict[str, Any]]:
    """The client's files, newest first; `after`: the last id of the previous page."""
    query = select(*_COLUMNS).where(FILES.c.client == client, FILES.c.deleted.is_(False))
    if purpose:
        query = query.where(FILES.c.purpose == purpose)
    with engine.connect() as conn:
        if after:
            anchor = conn.execute(select(FILES.c.created_at).where(FILES.c.id == after)).first()
            if anchor is not None:
                query = query.where(
                    (FILES.c.created_at < anchor.created_at)
                    | ((FILES.c.created_at == anchor.created_at) & (FILES.c.id < after))
                )
        rows = conn.execute(
            query.order_by(FILES.c.created_at.desc(), FILES.c.id.desc()).limit(limit)
        ).all()
    return [dict(r._mapping) for r in rows]


def delete(engine: Engine, file_id: str, client: str) -> bool:
    with writers_turn(engine), for_writes(engine).begin() as conn:
        done = conn.execute(update(FILES).where(
            FILES.c.id == file_id, FILES.c.client == client, FILES.c.deleted.is_(False)
        ).values(deleted=True))  # fmt: skip
        return bool(done.rowcount)


def in_use(engine: Engine, sha256: str) -> bool:
    """Whether any file not deleted still has these bytes (then they stay on disk)."""
    with engine.connect() as conn:
        return conn.execute(select(FILES.c.id).where(
            FILES.c.sha256 == sha256, FILES.c.deleted.is_(False)
        ).limit(1)).first() is not None  # fmt: skip
