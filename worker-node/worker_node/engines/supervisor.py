"""Keeps an engine serving: notices when it dies, reports it, brings it back with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from worker_node.engines.base import Engine
from worker_node.errors import EngineError

log = logging.getLogger("agora.worker.engine")


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"  # died; being brought back
    STOPPED = "stopped"


@dataclass
class EngineStatus:
    state: EngineState = EngineState.STARTING
    restarts: int = 0
    last_error: str = ""
    since: float = 0.0  # monotonic time of the last state change


class Supervisor:
    def __init__(
        self,
        name: str,
        engine: Engine,
        on_change: Callable[[str, EngineStatus], None] | None = None,
        restart_initial_s: float = 1.0,  # first wait before respawning a dead engine
        restart_max_s: float = 60.0,  # backoff ceiling between failed restarts
        check_interval_s: float = 0.5,  # how often liveness is checked
        failures_before_restart: int = 3,  # consecutive failed checks that mean "dead"
    ) -> None:
        self.name = name
        self.engine = engine
        self.status = EngineStatus(since=time.monotonic())
        self._on_change = on_change
        self._restart_initial_s = restart_initial_s
        self._restart_max_s = restart_max_s
        self._check_interval_s = check_interval_s
        self._failures_before_restart = failures_before_restart

    @property
    def available(self) -> bool:
        return self.status.state is EngineState.READY

    def _set(self, state: EngineState, error: str = "") -> None:
        self.status.state = state
        self.status.since = time.monotonic()
        if error:
            self.status.last_error = error
        if self._on_change:
            self._on_change(self.name, self.status)

    async def start(self) -> None:
        """First start: failures propagate (a node that cannot start its engine should say why
        and exit, not spin)."""
        await self.engine.start()
        self._set(EngineState.READY)

    async def watch(self, stop: asyncio.Event) -> None:
        """Until `stop`: check liveness, restart on death."""
        failures = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._check_interval_s)
            if stop.is_set():
                break
            if await self.engine.healthy():
                failures = 0
                continue
            failures += 1
            if failures >= self._failures_before_restart or self.engine.pid is not None:
                await self._recover(stop)
                failures = 0

    async def _recover(self, stop: asyncio.Event) -> None:
        log.warning("engine for %s is down; restarting", self.name)
        self._set(EngineState.RESTARTING, "engine stopped responding")
        delay = self._restart_initial_s
        started = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return
            try:
                await self.engine.restart()
            except EngineError as exc:
                log.warning("restart of %s failed: %s", self.name, str(exc).splitlines()[0])
                self.status.last_error = str(exc)
                delay = min(self._restart_max_s, delay * 2)
                continue
            self.status.restarts += 1
            log.info("engine for %s back after %.1f s", self.name, time.monotonic() - started)
            self._set(EngineState.READY)
            return

    async def stop(self) -> None:
        await self.engine.stop()
        self._set(EngineState.STOPPED)
