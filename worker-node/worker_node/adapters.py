"""The LoRA adapters one engine holds: had by hash, checked, loaded on demand.

A job may name a registered adapter by the SHA-256 of its canonical archive
(protocol.adapter). The node keeps a copy on disk per hash, asks its coordinator for one it
lacks (over the session it already holds), and checks the hash of what it got, and of the
folder again right before every load: bytes that are not the ones the hash names are refused
and deleted, never served. At most `capacity` adapters are loaded in the engine at once (its
`--max-loras`); to make room the least recently used one that no running job uses is unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx

from protocol.adapter import digest, folder_digest, unpack
from protocol.errors import MalformedMessage
from worker_node.engines.base import Engine
from worker_node.errors import AdapterError, AdapterRefused, AdapterSlotsFull

log = logging.getLogger("agora.worker.adapters")

Fetch = Callable[[str], Awaitable[bytes]]  # the archive of an adapter, by hash


class AdapterSlots:
    def __init__(
        self,
        engine: Engine,
        folder: Path,
        capacity: int,
        on_change: Callable[[], None] = lambda: None,
        timeout_s: float = 60.0,
        tag: str = "",
    ) -> None:
        self._engine = engine
        # the engine knows an adapter as `tag-sha256`: nodes sharing one engine keep theirs apart
        self._tag = tag
        self._folder = folder  # one sub-folder per hash
        self.capacity = capacity
        self._on_change = on_change  # the loaded set changed: tell the coordinators
        self._timeout_s = timeout_s
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._in_use: Counter[str] = Counter()
        self._locks: dict[str, asyncio.Lock] = {}
        self._room = asyncio.Lock()  # one eviction decision at a time
        self.cold_loads = 0  # loads into the engine (each a job that waited for one)

    def held(self) -> list[str]:
        return list(self._loaded)

    def forget(self) -> None:
        """The engine restarted: it holds no adapter now."""
        if self._loaded:
            self._loaded.clear()
            self._on_change()

    @contextlib.asynccontextmanager
    async def use(self, sha256: str, fetch: Fetch | None) -> AsyncIterator[str]:
        """Hold the adapter loaded while the caller runs a job with it; yield the name the
        engine knows it by."""
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            if sha256 not in self._loaded:
                await self._load(sha256, fetch)
            self._loaded.move_to_end(sha256)
            self._in_use[sha256] += 1
        try:
            yield self._name(sha256)
        finally:
            self._in_use[sha256] -= 1
            if self._in_use[sha256] <= 0:
                del self._in_use[sha256]

    async def _load(self, sha256: str, fetch: Fetch | None) -> None:
        path = self._folder / sha256
        try:  # hashing and unpacking off the event loop: running jobs keep streaming
            if not path.is_dir():
                if fetch is None:
                    raise AdapterError(f"adapter {sha256[:12]} is not here and cannot be fetched")
                await asyncio.to_thread(_keep, sha256, await fetch(sha256), path)
            found = await asyncio.to_thread(_digest_of, path)
        except OSError as exc:  # a full or unwritable disk: this node cannot, another may
            raise AdapterError(f"adapter {sha256[:12]}: {exc}") from exc
        if found != sha256:  # changed on disk since it was checked: never load it
            shutil.rmtree(path, ignore_errors=True)
            log.warning("adapter %s changed on disk (now %s): refused and deleted",
                        sha256[:12], found[:24])  # fmt: skip
            raise AdapterRefused(
                f"adapter {sha256[:12]} on this node does not match its hash; refused "
                "(the copy is deleted and will be fetched again)"
            )
        async with self._room:
            await self._make_room()
            body = {"lora_name": self._name(sha256), "lora_path": str(path)}
            await self._engine_call("load_lora_adapter", body)
            self._loaded[sha256] = None
        self.cold_loads += 1
        log.info("adapter %s loaded (%d of %d slots)", sha256[:12], len(self._loaded),
                 self.capacity)  # fmt: skip
        self._on_change()

    async def _make_room(self) -> None:
        while len(self._loaded) >= self.capacity:
            idle = next((s for s in self._loaded if not self._in_use.get(s)), None)
            if idle is None:
                raise AdapterSlotsFull(
                    f"all {self.capacity} adapter slots are in use by running jobs"
                )
            # not loaded from now on: a job arriving during the unload call loads it again
            # (after this one, under the same lock) instead of sending the engine a name it
            # is about to forget
            del self._loaded[idle]
            await self._engine_call("unload_lora_adapter", {"lora_name": self._name(idle)})

    def _name(self, sha256: str) -> str:
        return f"{self._tag}-{sha256}" if self._tag else sha256

    async def _engine_call(self, action: str, body: dict[str, str]) -> None:
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s) as client:
                response = await client.post(f"{self._engine.base_url}/{action}", json=body)
        except httpx.HTTPError as exc:
            raise AdapterError(f"engine unreachable for {action}: {exc}") from exc
        text = response.text
        if response.status_code == 200:
            return
        if "already been loaded" in text:  # by this node before the engine's answer was lost
            return
        if action.startswith("unload") and response.status_code == 404:  # gone already
            return
        raise AdapterError(f"the engine refused {action} ({response.status_code}): {text[:300]}")


def _keep(sha256: str, archive: bytes, path: Path) -> None:
    """Unpack an archive into `path` if it is the one its hash names; refuse it otherwise."""
    if digest(archive) != sha256:
        raise AdapterRefused(
            f"adapter {sha256[:12]}: the bytes received hash to {digest(archive)[:12]}, refused"
        )
    staging = path.with_name(path.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        unpack(archive, staging)
    except MalformedMessage as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AdapterRefused(f"adapter {sha256[:12]}: {exc}") from exc
    staging.rename(path)


def _digest_of(path: Path) -> str:
    try:
        return folder_digest(path)
    except MalformedMessage as exc:
        return f"unreadable ({exc})"
