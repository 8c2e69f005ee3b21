"""A batch's lifecycle in-process (the coordinator's real parts and store, no workers): what
expiry leaves, and a line that ran before a restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator.app import Coordinator
from coordinator.services.accounts import Principal
from coordinator.store import batches_store
from tests.coordinator.test_request_path import client


def _file(lines: int) -> bytes:
    request = {"method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    return "".join(json.dumps({"custom_id": f"x{i}", **request}) + "\n"
                   for i in range(lines)).encode()  # fmt: skip


async def _batch(coordinator: Coordinator, lines: int) -> tuple[Principal, dict[str, Any]]:
    """A client and its batch of `lines` requests, created (nothing runs them here)."""
    alice = await client(coordinator)
    upload = await coordinator.files.upload(alice.client, "in.jsonl", "batch", _file(lines))
    batch = await coordinator.batches.create(alice, upload["id"], "/v1/chat/completions",
                                             "24h", None)  # fmt: skip
    return alice, batch


async def test_an_expired_batch_settles_what_ran_and_names_the_rest_expired(
    coordinator: Coordinator,
) -> None:
    alice, batch = await _batch(coordinator, 3)
    # one line ran before the window closed (no worker serves `m` here: it is written as done)
    now = datetime.now(UTC)
    [first] = batches_store.claim(coordinator.db, batch["id"], "someone", now,
                                  now + timedelta(minutes=1), 1)  # fmt: skip
    batches_store.finish(coordinator.db, batch["id"], first["line"], "someone", state="done",
                         status_code=200, response='{"ok": true}', now=now)  # fmt: skip
    batches_store.transition(coordinator.db, batch["id"], ("in_progress",), "in_progress",
                             expires_at=now - timedelta(seconds=1))  # fmt: skip

    await coordinator.batches._tick()

    done = await coordinator.batches.describe(alice.client, batch["id"])
    assert done["status"] == "expired"
    assert done["expired_at"] is not None
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    output = await coordinator.files.content(alice.client, done["output_file_id"])
    assert [json.loads(line)["custom_id"] for line in output.splitlines()] == ["x0"]
    errors = await coordinator.files.content(alice.client, done["error_file_id"])
    parsed = [json.loads(line) for line in errors.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in parsed] == [
        ("x1", "batch_expired"), ("x2", "batch_expired")]  # fmt: skip


async def test_a_running_line_is_taken_again_after_a_restart_or_its_lease_under_its_request_id(
    coordinator: Coordinator,
) -> None:
    _alice, batch = await _batch(coordinator, 2)
    owner = coordinator.batches._owner
    now = datetime.now(UTC)
    taken = batches_store.claim(coordinator.db, batch["id"], owner, now,
                                now + timedelta(hours=1), 2)  # fmt: skip
    assert batches_store.claim(coordinator.db, batch["id"], "other", now, now, 2) == []
    later = now + timedelta(hours=2)  # the owner's lease ran out: it died; another takes them
    assert len(batches_store.claim(coordinator.db, batch["id"], "other", later, later, 2)) == 2
    batches_store.reset_owned(coordinator.db, "other")
    batches_store.claim(coordinator.db, batch["id"], owner, now, now + timedelta(hours=1), 2)
    assert batches_store.reset_owned(coordinator.db, owner) == 2  # what `run` does first
    again = batches_store.claim(coordinator.db, batch["id"], "other", now, now, 2)
    assert [r["request_id"] for r in again] == [r["request_id"] for r in taken]
