"""Batch API state: batches, their lines, and the claims processes take on lines.

A line is claimed by one process at a time (a conditional UPDATE: pending, or running under a
lease that ran out because its owner died), so replicas and processes sharing the database
never run a line twice at once; its request id is fixed when the batch is created, so a line
run again after a crash cannot be billed twice (the ledger posts a request id once)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from coordinator.store.db import for_writes, writers_turn
from coordinator.store.tables import BATCH_LINES, BATCHES

ACTIVE = ("validating", "in_progress", "cancelling", "finalizing")
_L = BATCH_LINES.c
_B = BATCHES.c


def create(engine: Engine, batch: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """The batch and every line, in one transaction (a batch exists whole or not at all)."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        conn.execute(insert(BATCHES).values(**batch))
        for start in range(0, len(lines), 1000):
            conn.execute(insert(BATCH_LINES), lines[start : start + 1000])


def get(engine: Engine, batch_id: str, client: str | None = None) -> dict[str, Any] | None:
    query = select(BATCHES).where(_B.id == batch_id)
    if client is not None:
        query = query.where(_B.client == client)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def listed(
    engine: Engine, client: str | None, limit: int, after: str | None = None
) -> list[dict[str, Any]]:
    """Batches newest first (a client's, or everyone's for the operator)."""
    query = select(BATCHES)
    if client is not None:
        query = query.where(_B.client == client)
    with engine.connect() as conn:
        if after:
            anchor = conn.execute(select(_B.created_at).where(_B.id == after)).first()
            if anchor is not None:
                query = query.where(or_(
                    _B.created_at < anchor.created_at,
                    and_(_B.created_at == anchor.created_at, _B.id < after),
                ))  # fmt: skip
        rows = conn.execute(query.order_by(_B.created_at.desc(), _B.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in rows]


def active(engine: Engine) -> list[dict[str, Any]]:
    """Batches some process still has to run or finish, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(BATCHES).where(_B.status.in_(ACTIVE)).order_by(_B.created_at)
        ).all()
    return [dict(r._mapping) for r in rows]


def counts(engine: Engine, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Lines per state of each batch."""
    out: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
    if not batch_ids:
        return out
    with engine.connect() as conn:
        rows = conn.execute(
            select(_L.batch_id, _L.state, func.count())
            .where(_L.batch_id.in_(batch_ids))
            .group_by(_L.batch_id, _L.state)
        ).all()
    for batch_id, state, count in rows:
        out[batch_id][state] = count
    return out


def usage(engine: Engine, batch_id: str) -> tuple[int, int]:
    """(prompt, completion) tokens its finished lines used."""
    with engine.connect() as conn:
        row = conn.execute(
            select(func.coalesce(func.sum(_L.prompt_tokens), 0),
                   func.coalesce(func.sum(_L.completion_tokens), 0))
            .where(_L.batch_id == batch_id)
        ).one()  # fmt: skip
    return int(row[0]), int(row[1])


def transition(
    engine: Engine, batch_id: str, from_states: tuple[str, ...], to: str,
    finalizing_before: datetime | None = None, **values: Any,
) -> bool:  # fmt: skip
    """Move a batch to `to` if it is in one of `from_states` (False: someone else moved it);
    with `finalizing_before`, only if its finalizing began before then (a takeover)."""
    where = [_B.id == batch_id, _B.status.in_(from_states)]
    if finalizing_before is not None:
        where.append(_B.finalizing_at < finalizing_before)
    with writers_turn(engine), for_writes(engine).begin() as conn:
        done = conn.execute(update(BATCHES).where(*where).values(status=to, **values))
        return bool(done.rowcount)


def claim(
    engine: Engine, batch_id: str, owner: str, now: datetime, lease_until: datetime, limit: int
) -> list[dict[str, Any]]:
    """Take up to `limit` lines to run: pending ones, or running ones whose owner's lease ran
    out (it died mid-line), in file order."""
    claimable = and_(
        _L.batch_id == batch_id,
        or_(_L.state == "pending", and_(_L.state == "running", _L.lease_until < now)),
    )
    with writers_turn(engine), for_writes(engine).begin() as conn:
        rows = conn.execute(
            select(_L.line, _L.custom_id, _L.body, _L.request_id)
            .where(claimable).order_by(_L.line).limit(limit)
        ).all()  # fmt: skip
        taken = []
        for row in rows:
            done = conn.execute(
                update(BATCH_LINES).where(claimable, _L.line == row.line)
                .values(state="running", owner=owner, lease_until=lease_until)
            )  # fmt: skip
            if done.rowcount:
                taken.append(dict(row._mapping))
        return taken


def release(engine: Engine, batch_id: str, line: int, owner: str) -> None:
    """A claimed line back to pending (it could not run now: no free capacity)."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        conn.execute(
            update(BATCH_LINES)
            .where(_L.batch_id == batch_id, _L.line == line, _L.owner == owner,
                   _L.state == "running")
            .values(state="pending", owner=None, lease_until=None)
        )  # fmt: skip


def finish(
    engine: Engine, batch_id: str, line: int, owner: str, *, state: str, status_code: int,
    response: str, prompt_tokens: int = 0, completion_tokens: int = 0, now: datetime,
) -> None:  # fmt: skip
    with writers_turn(engine), for_writes(engine).begin() as conn:
        conn.execute(
            update(BATCH_LINES)
            .where(_L.batch_id == batch_id, _L.line == line, _L.owner == owner,
                   _L.state == "running")
            .values(state=state, status_code=status_code, response=response, lease_until=None,
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    finished_at=now)
        )  # fmt: skip


def fail_unrun(engine: Engine, batch_id: str, response: str, now: datetime) -> int:
    """Every line not run failed with `response` (the batch stopped before running them):
    pending ones, and running ones whose owner died (its lease ran out)."""
    unrun = or_(_L.state == "pending", and_(_L.state == "running", _L.lease_until < now))
    with writers_turn(engine), for_writes(engine).begin() as conn:
        done = conn.execute(
            update(BATCH_LINES)
            .where(_L.batch_id == batch_id, unrun)
            .values(state="failed", status_code=None, response=response, finished_at=now,
                    owner=None, lease_until=None)
        )  # fmt: skip
        return int(done.rowcount)


def reset_owned(engine: Engine, owner: str) -> int:
    """Lines this owner was running when it last stopped, back to pending (at its start)."""
    with writers_turn(engine), for_writes(engine).begin() as conn:
        done = conn.execute(
            update(BATCH_LINES).where(_L.owner == owner, _L.state == "running")
            .values(state="pending", owner=None, lease_until=None)
        )  # fmt: skip
        return int(done.rowcount)


def results(engine: Engine, batch_id: str) -> list[dict[str, Any]]:
    """Every finished line in file order, for the output and error files."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(_L.line, _L.custom_id, _L.request_id, _L.state, _L.status_code, _L.response)
            .where(_L.batch_id == batch_id, _L.state.in_(("done", "failed")))
            .order_by(_L.line)
        ).all()  # fmt: skip
    return [dict(r._mapping) for r in rows]
