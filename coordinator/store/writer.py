"""One thread owns the ledger's writes and commits them in groups.

However many settlements are waiting share one database transaction (one commit, one fsync on
PostgreSQL), each inside its own savepoint, so one that fails (duplicate, overdraft) rolls back
alone and its caller gets the error. Callers await a future; the event loop never blocks on
the database.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from coordinator.store.db import for_writes, writers_turn

log = logging.getLogger("agora.coordinator.ledger")
T = TypeVar("T")
# PostgreSQL's deadlock_detected and serialization_failure: replicas sharing a database lock
# the same hot rows (network fees, a busy client) in different orders; the loser retries
_RETRYABLE = {"40P01", "40001"}
RETRIES = 8


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in _RETRYABLE


@dataclass
class _Work:
    fn: Callable[[Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(work: _Work, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if work.future.done():
            return
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)

    work.loop.call_soon_threadsafe(settle)


class LedgerWriter:
    def __init__(self, engine: Engine, max_batch: int = 256) -> None:
        self._engine = engine
        self._max_batch = max_batch  # most units of work in one database transaction
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
                self._thread.start()

    async def submit(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn(connection)` inside the writer's transaction (its own savepoint); return
        its result once committed, or raise what it raised (then nothing of it was written)."""
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Work(fn, future, loop))
        return await future

    def close(self) -> None:
        """Finish queued work, then stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Work]) -> None:
        outcomes: list[tuple[_Work, Any, BaseException | None]] = []
        try:
            with writers_turn(self._engine), for_writes(self._engine).begin() as conn:
                for work in batch:
                    outcomes.append(self._apply(conn, work))
        except Exception as exc:  # the commit itself failed: nothing of the batch was written
            log.exception("ledger commit of %d unit(s) failed", len(batch))
            for work in batch:
                _resolve(work, None, exc)
            return
        for work, result, error in outcomes:
            _resolve(work, result, error)

    @staticmethod
    def _apply(conn: Connection, work: _Work) -> tuple[_Work, Any, BaseException | None]:
        """Run one unit in its savepoint; rolled back alone if it fails, retried (after the
        rollback frees its locks for the other side) if it lost a deadlock."""
        for attempt in range(RETRIES):
            savepoint = conn.begin_nested()
            try:
                result = work.fn(conn)
            except Exception as exc:
                savepoint.rollback()
                if _retryable(exc) and attempt < RETRIES - 1:
                    time.sleep(random.uniform(0.001, 0.01 * (attempt + 1)))
                    continue
                return work, None, exc
            savepoint.commit()
            return work, result, None
        raise AssertionError("unreachable")
