"""The admin audit log: append-only, hash-chained (each row's hash covers the previous one's),
so `agora ledger check` can tell when a row was edited, removed or inserted out of order."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, text

from coordinator.store.models import utcnow
from coordinator.store.tables import AUDIT

GENESIS = "0" * 64
_CHAIN_LOCK = 0x4147_4F52_4155_4454  # one writer at a time on PostgreSQL (several coordinators)


def _digest(prev: str, at: datetime, actor: str, action: str, subject: str, detail: str) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    stamp = at.isoformat(timespec="microseconds")
    message = json.dumps([prev, stamp, actor, action, subject, detail], separators=(",", ":"))
    return hashlib.sha256(message.encode()).hexdigest()


def append(conn: Connection, actor: str, action: str, subject: str = "", **detail: Any) -> str:
    """Record one admin action inside the caller's transaction; its hash."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})
    prev = conn.execute(select(AUDIT.c.sha256).order_by(AUDIT.c.id.desc()).limit(1)).scalar()
    prev = prev or GENESIS
    at = utcnow()
    body = json.dumps(detail, sort_keys=True, separators=(",", ":"))
    digest = _digest(prev, at, actor, action, subject, body)
    conn.execute(
        insert(AUDIT).values(
            at=at, actor=actor, action=action, subject=subject, detail=body,
            prev_sha256=prev, sha256=digest,
        )
    )  # fmt: skip
    return digest


def events(conn: Connection, limit: int | None = None) -> list[dict[str, Any]]:
    query = select(AUDIT).order_by(AUDIT.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    return [
        {"id": r.id, "at": r.at.isoformat(), "actor": r.actor, "action": r.action,
         "subject": r.subject, "detail": json.loads(r.detail), "sha256": r.sha256}
        for r in conn.execute(query)
    ]  # fmt: skip


def latest(engine: Engine, limit: int | None = None) -> list[dict[str, Any]]:
    """`events`, on a connection of its own."""
    with engine.connect() as conn:
        return events(conn, limit)


def check_chain(conn: Connection) -> list[str]:
    problems: list[str] = []
    prev = GENESIS
    for r in conn.execute(select(AUDIT).order_by(AUDIT.c.id)):
        if r.prev_sha256 != prev:
            problems.append(f"audit event {r.id} does not follow the one before it")
        if _digest(r.prev_sha256, r.at, r.actor, r.action, r.subject, r.detail) != r.sha256:
            problems.append(f"audit event {r.id} was altered")
        prev = r.sha256
    return problems
