"""Model releases: each public name's policy and versions, written whole in one transaction
together with its history event and the admin audit log entry."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, delete, insert, select

from coordinator.store import audit_store
from coordinator.store.db import for_writes, writers_turn
from coordinator.store.models import utcnow
from coordinator.store.tables import RELEASE_EVENTS, RELEASES, VERSIONS

_VERSION_FIELDS = (
    "version", "serves", "adapter_sha256", "tokenizer_sha256", "max_price_prompt_per_mtok",
    "max_price_completion_per_mtok", "weight", "state",
)  # fmt: skip


def load(engine: Engine) -> list[dict[str, Any]]:
    """Every release as {name, stable, sticky, shadow_version, shadow_share, rollback,
    versions: [...]}."""
    with engine.connect() as conn:
        versions: dict[str, list[dict[str, Any]]] = {}
        for row in conn.execute(select(VERSIONS).order_by(VERSIONS.c.version)):
            versions.setdefault(row.model, []).append({f: getattr(row, f) for f in _VERSION_FIELDS})
        return [
            {
                "name": r.name,
                "stable": r.stable,
                "sticky": r.sticky,
                "shadow_version": r.shadow_version,
                "shadow_share": r.shadow_share,
                "rollback": json.loads(r.rollback),
                "versions": versions.get(r.name, []),
            }
            for r in conn.execute(select(RELEASES).order_by(RELEASES.c.name))
        ]


def save(
    engine: Engine, release: dict[str, Any], *, kind: str, version: str, actor: str,
    detail: dict[str, Any],
) -> None:  # fmt: skip
    """Replace a release (policy and versions) and record why, atomically."""
    name, now = release["name"], utcnow()
    with writers_turn(engine), for_writes(engine).begin() as conn:
        conn.execute(delete(VERSIONS).where(VERSIONS.c.model == name))
        conn.execute(delete(RELEASES).where(RELEASES.c.name == name))
        conn.execute(
            insert(RELEASES).values(
                name=name, stable=release["stable"], sticky=release["sticky"],
                shadow_version=release["shadow_version"], shadow_share=release["shadow_share"],
                rollback=json.dumps(release["rollback"], sort_keys=True), updated_at=now,
            )
        )  # fmt: skip
        conn.execute(
            insert(VERSIONS),
            [{"model": name, "created_at": now, **{f: v[f] for f in _VERSION_FIELDS}}
             for v in release["versions"]],
        )  # fmt: skip
        body = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        conn.execute(
            insert(RELEASE_EVENTS).values(
                model=name, version=version, kind=kind, actor=actor, detail=body, at=now
            )
        )
        audit_store.append(conn, actor, f"model.{kind}", name, version=version, **detail)


def history(engine: Engine, model: str, limit: int = 100) -> list[dict[str, Any]]:
    """A model's release events, newest first."""
    query = (
        select(RELEASE_EVENTS).where(RELEASE_EVENTS.c.model == model)
        .order_by(RELEASE_EVENTS.c.id.desc()).limit(limit)
    )  # fmt: skip
    with engine.connect() as conn:
        return [
            {"at": r.at.isoformat(), "version": r.version, "kind": r.kind, "actor": r.actor,
             "detail": json.loads(r.detail)}
            for r in conn.execute(query)
        ]  # fmt: skip
