"""The owner of every batch's lifecycle: created (validated) → in_progress → finalizing →
completed | expired | cancelled.

Lines run as low-priority requests: a line is started only while its model keeps at least
`headroom_share` of its slots free for online traffic after it, never waits in the online
queue (no capacity: it goes back to the batch), and is served at the workers' batch prices by
the cheapest eligible worker first. Each line's credit is held when it runs, like any request;
a batch whose client runs out of credit stops, and its unrun lines become error lines, not a
debt. State lives in the database (services write it through coordinator.store): a process
that restarts takes its lines back, and lines a dead process held are taken after their
lease; a line's request id is fixed, so it is billed at most once however often it runs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from coordinator.errors import InvalidRequest, NotFound
from coordinator.services.accounts import Principal
from coordinator.services.admission import Limits
from coordinator.services.batches.files import FileLibrary
from coordinator.services.batches.lines import jsonl, output_line, unrun_line
from coordinator.services.registry import Registry
from coordinator.store import batches_store
from coordinator.store.db import Engine
from protocol.advert import EMBED, GENERATE

log = logging.getLogger("agora.coordinator.batches")
T = TypeVar("T")
WINDOWS = {"24h": timedelta(hours=24)}
_UNRUN = {  # why lines were left unrun -> (error code, message)
    "expired": ("batch_expired", "The batch expired before this request ran."),
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "insufficient_credit": ("insufficient_credit",
                            "The client's credit ran out before this request ran."),
}  # fmt: skip


@dataclass(frozen=True)
class LineResult:
    """How one line ended, as the API layer ran it (coordinator.api.batch_lines)."""

    status_code: int
    body: Any  # the endpoint's response, or the OpenAI error envelope
    retry: bool = False  # no capacity now: back to the batch's queue, not an error
    out_of_credit: bool = False  # the client cannot pay for it: the batch stops
    prompt_tokens: int = 0
    completion_tokens: int = 0


# (principal, endpoint URL, body, request id, called once the line holds a worker's slot)
RunLine = Callable[[Principal, str, dict[str, Any], str, Callable[[], None]], Awaitable[LineResult]]


@dataclass(frozen=True)
class BatchPolicy:
    headroom_share: float = 0.25  # of a model's slots kept free for online traffic
    max_in_flight: int = 64  # lines this process runs at once, all batches together
    lease_s: float = 600.0  # a running line's claim (another process takes it after this)
    tick_s: float = 0.5  # how often batches are looked at when no slot frees up
    min_tick_s: float = 0.05  # and at most this often (each look reads the database)
    retry_s: float = 1.0  # a line that could not run now: its batch starts none for this long
    finalize_takeover_s: float = 300.0  # a batch left `finalizing` this long is finished again
    max_lines: int = 50_000  # requests one batch may hold


def room(slots: list[tuple[int, int]], headroom_share: float, launching: int) -> int:
    """Lines a model can take now: what is free beyond the headroom kept for online traffic
    (at least one slot), less lines started but not yet holding a slot. `slots`: (free,
    capacity) of each available worker."""
    capacity = sum(c for _f, c in slots)
    if capacity == 0:
        return 0
    headroom = max(1, math.ceil(capacity * headroom_share))
    return max(0, sum(f for f, _c in slots) - headroom - launching)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


class BatchRunner:
    def __init__(
        self, db: Engine, files: FileLibrary, registry: Registry, run_line: RunLine,
        owner: str, policy: BatchPolicy,
        served_by: Callable[[str], list[str]] = lambda name: [name],
    ) -> None:  # fmt: skip
        self._db = db
        self._files = files
        self._registry = registry
        self._run_line = run_line
        self._served_by = served_by  # a client's model name (a release's too) -> served models
        self._owner = owner  # this process, the same across its restarts
        self.policy = policy
        self._tasks: set[asyncio.Task[None]] = set()
        self._launching: dict[str, int] = {}  # model -> lines started, no slot held yet
        self._running: dict[str, int] = {}  # batch id -> its lines running here
        self._paused: dict[str, datetime] = {}  # batch id -> no new lines before then
        self._wake = asyncio.Event()
        # the runner's reads and writes wait on their own thread: the default pool stays free
        # for the request path (a busy batch once left online requests queued behind it)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="agora-batches")

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args, **kwargs))

    # ------------------------------------------------------------------ the API's operations
    async def create(
        self, principal: Principal, input_file_id: str, endpoint: str, window: str,
        metadata: dict[str, str] | None,
    ) -> dict[str, Any]:  # fmt: skip
        if window not in WINDOWS:
            raise InvalidRequest('completion_window must be "24h".', param="completion_window")
        file, lines = await self._files.requests(principal.client, input_file_id)
        wrong = [n for n, line in enumerate(lines, 1) if line.url != endpoint]
        if wrong:
            raise InvalidRequest(
                f"Requests {_few(wrong)} of {input_file_id} are not for {endpoint}; a batch "
                "runs one endpoint.", param="endpoint",
            )  # fmt: skip
        models = {line.body["model"] for line in lines}
        if len(models) > 1:
            raise InvalidRequest(
                f"{input_file_id} asks {len(models)} models ({_few(sorted(models))}); a batch "
                "runs one model, as OpenAI's does.", param="input_file_id",
            )  # fmt: skip
        model = next(iter(models))
        self._check_model(model, _task_of(endpoint))
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = _now()
        batch = {
            "id": batch_id, "client": principal.client, "key_id": principal.key_id,
            "endpoint": endpoint, "model": model, "input_file_id": file["id"],
            "completion_window": window, "status": "in_progress",
            "metadata_json": json.dumps(metadata or {}), "total": len(lines), "created_at": now,
            "in_progress_at": now, "expires_at": now + WINDOWS[window],
        }  # fmt: skip
        stem = batch_id.removeprefix("batch_")
        rows = [
            {"batch_id": batch_id, "line": i, "custom_id": line.custom_id,
             "body": json.dumps(line.body), "request_id": f"b{stem}l{i}", "state": "pending",
             "prompt_tokens": 0, "completion_tokens": 0}
            for i, line in enumerate(lines)
        ]  # fmt: skip
        await self._store(batches_store.create, self._db, batch, rows)
        self._wake.set()
        return await self.describe(principal.client, batch_id)

    def _check_model(self, model: str, task: str) -> None:
        """Refuse a batch for a model whose nodes all do another task (one that no node serves
        now may still get one within the batch's window: its lines wait)."""
        slots = [s for served in self._served_by(model) for s in self._registry.pool(served)]
        if slots and not any(s.task == task for s in slots):
            kind = "an embedding model" if task == GENERATE else "not an embedding model"
            raise InvalidRequest(f"The model `{model}` is {kind}; this batch's endpoint cannot "
                                 "run on it.", param="model", code="wrong_model_task")  # fmt: skip

    async def describe(self, client: str | None, batch_id: str) -> dict[str, Any]:
        row = await self._store(batches_store.get, self._db, batch_id, client)
        if row is None:
            raise NotFound(f"No such batch: {batch_id}.", param="batch_id")
        counts = await self._store(batches_store.counts, self._db, [batch_id])
        return batch_object(row, counts[batch_id])

    async def listed(
        self, client: str | None, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        rows = await self._store(batches_store.listed, self._db, client, limit, after)
        counts = await self._store(batches_store.counts, self._db, [r["id"] for r in rows])
        return [batch_object(r, counts[r["id"]]) for r in rows]

    async def cancel(self, client: str, batch_id: str) -> dict[str, Any]:
        """Stop starting lines; those running finish; then the batch is `cancelled` with what
        was done in its output file."""
        await self.describe(client, batch_id)  # 404 unless it is the client's
        moved = await self._store(
            batches_store.transition, self._db, batch_id, ("validating", "in_progress"),
            "cancelling", cancelling_at=_now(),
        )  # fmt: skip
        if not moved:
            current = await self.describe(client, batch_id)
            if current["status"] not in ("cancelling", "cancelled"):
                raise InvalidRequest(f"The batch is {current['status']}; it cannot be cancelled.",
                                     param="batch_id")  # fmt: skip
        self._wake.set()
        return await self.describe(client, batch_id)

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Run batches until cancelled (the coordinator's lifespan owns this task)."""
        taken_back = await self._store(batches_store.reset_owned, self._db, self._owner)
        if taken_back:
            log.warning("%d batch line(s) this process was running when it stopped run again",
                        taken_back)  # fmt: skip
        try:
            while True:
                freed = self._registry.freed_signal()
                try:
                    await self._tick()
                except Exception:
                    log.exception("batch runner tick failed")
                self._wake.clear()
                waits: list[Coroutine[Any, Any, Any]] = [freed.wait(), self._wake.wait()]
                pending = [asyncio.ensure_future(w) for w in waits]
                await asyncio.wait(pending, timeout=self.policy.tick_s,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                for future in pending:
                    future.cancel()
                await asyncio.sleep(self.policy.min_tick_s)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._executor.shutdown(wait=False)

    async def _tick(self) -> None:
        batches = await self._store(batches_store.active, self._db)
        if not batches:
            return
        counts = await self._store(batches_store.counts, self._db, [b["id"] for b in batches])
        now = _now()
        for batch in batches:
            mine = counts[batch["id"]]
            stop = self._stop_reason(batch, now)
            if batch["status"] == "finalizing":  # whoever began it died: finish it again
                taken = now - timedelta(seconds=self.policy.finalize_takeover_s)
                if await self._store(
                    batches_store.transition, self._db, batch["id"], ("finalizing",),
                    "finalizing", finalizing_before=taken, finalizing_at=now,
                ):  # fmt: skip
                    await self._write_files(batch, batch["stop_reason"])
                continue
            if stop is not None and (mine.get("pending") or mine.get("running")):
                code, message = _UNRUN[stop]
                response = json.dumps({"code": code, "message": message})
                await self._store(batches_store.fail_unrun, self._db, batch["id"], response, now)
                mine = (await self._store(batches_store.counts, self._db, [batch["id"]]))[
                    batch["id"]
                ]
            if not mine.get("pending") and not mine.get("running"):
                await self._finalize(batch, stop)
            elif (stop is None and batch["status"] == "in_progress"
                    and self._paused.get(batch["id"], now) <= now):  # fmt: skip
                await self._launch(batch)

    @staticmethod
    def _stop_reason(batch: dict[str, Any], now: datetime) -> str | None:
        if batch["status"] == "cancelling":
            return "cancelled"
        if batch["expires_at"] <= now:
            return "expired"
        reason: str | None = batch["stop_reason"]
        return reason

    async def _launch(self, batch: dict[str, Any]) -> None:
        model, task = batch["model"], _task_of(batch["endpoint"])
        pool = [s for served in self._served_by(model) for s in self._registry.pool(served)]
        slots = [(s.free_slots, s.max_concurrency) for s in pool
                 if s.available and s.task == task and s.takes_batches]  # fmt: skip
        free = room(slots, self.policy.headroom_share, self._launching.get(model, 0))
        free = min(free, self.policy.max_in_flight - len(self._tasks))
        if free <= 0:
            return
        now = _now()
        lease = now + timedelta(seconds=self.policy.lease_s)
        lines = await self._store(
            batches_store.claim, self._db, batch["id"], self._owner, now, lease, free
        )
        for line in lines:
            self._launching[model] = self._launching.get(model, 0) + 1
            self._running[batch["id"]] = self._running.get(batch["id"], 0) + 1
            job = asyncio.get_running_loop().create_task(self._run(batch, line))
            self._tasks.add(job)
            job.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[str, Any], line: dict[str, Any]) -> None:
        model = batch["model"]
        holding = False

        def dispatched() -> None:
            nonlocal holding
            if not holding:
                holding = True
                self._launching[model] -= 1

        principal = Principal(batch["client"], batch["key_id"], Limits())
        try:
            body = json.loads(line["body"])
            result = await self._run_line(principal, batch["endpoint"], body, line["request_id"],
                                          dispatched)  # fmt: skip
        except Exception as exc:  # never leave a line running: it becomes an error line
            log.exception("batch %s line %s failed", batch["id"], line["line"])
            result = LineResult(500, {"error": {"message": f"internal error: {exc}",
                                                "type": "api_error", "param": None,
                                                "code": None}})  # fmt: skip
        finally:
            dispatched()
            self._running[batch["id"]] -= 1
        await self._record(batch, line, result)
        if not result.retry:
            self._wake.set()

    async def _record(
        self, batch: dict[str, Any], line: dict[str, Any], result: LineResult
    ) -> None:
        db, batch_id, number = self._db, batch["id"], line["line"]
        # credit held by this batch's other running lines comes back when they are charged
        # (a hold is a line's worst case): only a line refused with none running stops it
        if result.retry or (result.out_of_credit and self._running.get(batch_id, 0) > 0):
            await self._store(batches_store.release, db, batch_id, number, self._owner)
            self._paused[batch_id] = _now() + timedelta(seconds=self.policy.retry_s)
            return
        await self._store(
            batches_store.finish, db, batch_id, number, self._owner,
            state="done" if result.status_code == 200 else "failed",
            status_code=result.status_code, response=json.dumps(result.body),
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            now=_now(),
        )  # fmt: skip
        if result.out_of_credit:
            log.info("batch %s stops: its client's credit ran out", batch_id)
            await self._store(batches_store.transition, db, batch_id, ("in_progress",),
                                    "in_progress", stop_reason="insufficient_credit")  # fmt: skip

    async def _finalize(self, batch: dict[str, Any], stop: str | None) -> None:
        """Move the batch to `finalizing` (one process wins; why it stopped is kept with it),
        then write its files and end it."""
        moved = await self._store(
            batches_store.transition, self._db, batch["id"], (batch["status"],), "finalizing",
            finalizing_at=_now(), stop_reason=stop,
        )  # fmt: skip
        if moved:
            await self._write_files(batch, stop)

    async def _write_files(self, batch: dict[str, Any], stop: str | None) -> None:
        """The output and error files, then the final state. A failure leaves the batch
        `finalizing`: the same or another process finishes it after `finalize_takeover_s`."""
        db, batch_id = self._db, batch["id"]
        try:
            files = await self._files_of(batch)
        except Exception:
            log.exception("batch %s: could not write its files; finishing it later", batch_id)
            return
        now = _now()
        final = {"cancelled": "cancelled", "expired": "expired"}.get(stop or "", "completed")
        values: dict[str, Any] = {**files, f"{final}_at": now}
        await self._store(batches_store.transition, db, batch_id, ("finalizing",), final,
                                **values)  # fmt: skip
        log.info("batch %s %s", batch_id, final)

    async def _files_of(self, batch: dict[str, Any]) -> dict[str, str]:
        batch_id, client = batch["id"], batch["client"]
        results = await self._store(batches_store.results, self._db, batch_id)
        outputs, errors = [], []
        for r in results:
            response = json.loads(r["response"] or "null")
            if r["status_code"] is None:
                errors.append(unrun_line(r["custom_id"], r["request_id"], response["code"],
                                         response["message"]))  # fmt: skip
            elif r["state"] == "done":
                outputs.append(output_line(r["custom_id"], r["request_id"], r["status_code"],
                                           response))  # fmt: skip
            else:
                errors.append(output_line(r["custom_id"], r["request_id"], r["status_code"],
                                          response))  # fmt: skip
        files: dict[str, str] = {}
        if outputs:
            out = await self._files.store(client, f"{batch_id}_output.jsonl", "batch_output",
                                          jsonl(outputs), len(outputs))  # fmt: skip
            files["output_file_id"] = out["id"]
        if errors:
            err = await self._files.store(client, f"{batch_id}_error.jsonl", "batch_output",
                                          jsonl(errors), len(errors))  # fmt: skip
            files["error_file_id"] = err["id"]
        log.info("batch %s: %d answered, %d errors", batch_id, len(outputs), len(errors))
        return files

    # ------------------------------------------------------------------ the operator's view
    async def overview(self, listed: list[dict[str, Any]]) -> dict[str, Any]:
        """Batches by status, and what they use of the market now (lines running here, of
        the slots their models have)."""
        by_status: dict[str, int] = {}
        for batch in listed:
            by_status[batch["status"]] = by_status.get(batch["status"], 0) + 1
        models = {b["model"] for b in listed if b["status"] in batches_store.ACTIVE}
        slots = sum(s.max_concurrency for m in models for s in self._registry.pool(m)
                    if s.available)  # fmt: skip
        queued = sum(b["request_counts"]["total"] - b["request_counts"]["completed"]
                     - b["request_counts"]["failed"] for b in listed
                     if b["status"] in batches_store.ACTIVE)  # fmt: skip
        return {"by_status": by_status, "running_lines": len(self._tasks),
                "queued_lines": queued, "model_slots": slots,
                "headroom_share": self.policy.headroom_share}  # fmt: skip


def batch_object(row: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """A batch as OpenAI describes it, with its live request counts."""
    total = row["total"]
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": None,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"], "created_at": _ts(row["created_at"]),
        "in_progress_at": _ts(row["in_progress_at"]), "expires_at": _ts(row["expires_at"]),
        "finalizing_at": _ts(row["finalizing_at"]), "completed_at": _ts(row["completed_at"]),
        "failed_at": None, "expired_at": _ts(row["expired_at"]),
        "cancelling_at": _ts(row["cancelling_at"]), "cancelled_at": _ts(row["cancelled_at"]),
        "request_counts": {"total": total, "completed": counts.get("done", 0),
                           "failed": counts.get("failed", 0)},
        "metadata": json.loads(row["metadata_json"] or "{}") or None,
        "model": row["model"], "client": row["client"],
    }  # fmt: skip


def _task_of(endpoint: str) -> str:
    return EMBED if endpoint == "/v1/embeddings" else GENERATE


def _few(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:10])
    return shown + (f" and {len(items) - 10} more" if len(items) > 10 else "")
