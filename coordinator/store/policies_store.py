"""Policies: their versions, who runs which, and the policy actions in the audit log. Every
change is written with its audit-log entry in one transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select

from coordinator.store import audit_store
from coordinator.store.db import for_writes, writers_turn
from coordinator.store.models import utcnow
from coordinator.store.tables import AUDIT, POLICY_ATTACHMENTS, POLICY_VERSIONS

POLICY_HIT = "policy.hit"  # the audit action of a policy step acting on a request


@dataclass(frozen=True)
class StoredPolicy:
    name: str
    version: int
    sha256: str
    spec: dict[str, Any]


def save(engine: Engine, name: str, spec: str, sha256: str, actor: str) -> tuple[int, bool]:
    """Store a policy's JSON as its next version; (the version, whether it is new): the same
    JSON as the newest version is that version."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        newest = conn.execute(
            select(POLICY_VERSIONS.c.version, POLICY_VERSIONS.c.sha256)
            .where(POLICY_VERSIONS.c.name == name)
            .order_by(POLICY_VERSIONS.c.version.desc())
            .limit(1)
        ).first()
        if newest is not None and newest.sha256 == sha256:
            return int(newest.version), False
        version = 1 + (int(newest.version) if newest is not None else 0)
        conn.execute(insert(POLICY_VERSIONS).values(
            name=name, version=version, sha256=sha256, spec=spec, created_at=utcnow()))  # fmt: skip
        audit_store.append(conn, actor, "policy.save", f"policy:{name}", version=version,
                           sha256=sha256)  # fmt: skip
        return version, True


def snapshot(engine: Engine) -> tuple[list[StoredPolicy], dict[str, str]]:
    """The newest version of every policy and every attachment, read together."""
    newest = (
        select(POLICY_VERSIONS.c.name, func.max(POLICY_VERSIONS.c.version).label("v"))
        .group_by(POLICY_VERSIONS.c.name)
        .subquery()
    )
    query = select(POLICY_VERSIONS).join(
        newest,
        (POLICY_VERSIONS.c.name == newest.c.name) & (POLICY_VERSIONS.c.version == newest.c.v),
    )
    with engine.connect() as conn, conn.begin():
        policies = [StoredPolicy(r.name, r.version, r.sha256, json.loads(r.spec))
                    for r in conn.execute(query)]  # fmt: skip
        rows = conn.execute(select(POLICY_ATTACHMENTS.c.subject, POLICY_ATTACHMENTS.c.policy))
        return policies, {r.subject: r.policy for r in rows}


def by_sha256(engine: Engine, sha256: str) -> StoredPolicy | None:
    with engine.connect() as conn:
        r = conn.execute(select(POLICY_VERSIONS).where(POLICY_VERSIONS.c.sha256 == sha256)).first()
    return StoredPolicy(r.name, r.version, r.sha256, json.loads(r.spec)) if r else None


def attach(engine: Engine, subject: str, policy: str | None, actor: str) -> None:
    """Make `subject` ("key:<id>" / "client:<name>") run `policy` (None: no policy of its own)."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        conn.execute(delete(POLICY_ATTACHMENTS).where(POLICY_ATTACHMENTS.c.subject == subject))
        if policy is not None:
            conn.execute(insert(POLICY_ATTACHMENTS).values(
                subject=subject, policy=policy, created_at=utcnow()))  # fmt: skip
        audit_store.append(conn, actor, "policy.attach" if policy else "policy.detach", subject,
                           policy=policy)  # fmt: skip


def record_hits(engine: Engine, subject: str, detail: dict[str, Any]) -> None:
    """One request's policy actions (kinds and counts, never values) in the audit log."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        audit_store.append(conn, "policy", POLICY_HIT, subject, **detail)


def recent_hits(engine: Engine, limit: int = 2000) -> list[dict[str, Any]]:
    """The newest policy actions from the audit log (newest first)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(AUDIT.c.at, AUDIT.c.subject, AUDIT.c.detail)
            .where(AUDIT.c.action == POLICY_HIT)
            .order_by(AUDIT.c.id.desc())
            .limit(limit)
        )
        return [{"at": r.at.isoformat(), "subject": r.subject, **json.loads(r.detail)}
                for r in rows]  # fmt: skip
