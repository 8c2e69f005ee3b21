"""The node's adapter slots: bytes that are not the hash they were asked by are refused before
anything is written or loaded; the least recently used idle adapter makes room; when every
slot runs a job, the node says it is full. The engine here is a loopback stand-in that
records load and unload calls (the real vLLM path is tests/test_lora_adapters.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from protocol.adapter import digest, pack
from worker_node.adapters import AdapterSlots
from worker_node.engines.attach import AttachedEngine
from worker_node.errors import AdapterError, AdapterRefused, AdapterSlotsFull


def archive(tmp_path: Path, seed: int) -> bytes:
    folder = tmp_path / f"src-{seed}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes([seed]) * 64)
    return pack(folder)


class Engine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.url = ""
        self.unload_delay_s = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        action = request.path.rsplit("/", 1)[-1]
        self.calls.append((action, body["lora_name"]))  # when it arrives
        if action.startswith("unload"):
            await asyncio.sleep(self.unload_delay_s)
        return web.Response(text="ok")


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    stand_in = Engine()
    app = web.Application()
    app.router.add_post("/v1/load_lora_adapter", stand_in.handle)
    app.router.add_post("/v1/unload_lora_adapter", stand_in.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stand_in.url = f"http://127.0.0.1:{port}"
    yield stand_in
    await runner.cleanup()


async def test_bytes_that_do_not_hash_to_the_asked_adapter_are_refused(
    tmp_path: Path, engine: Engine
) -> None:
    slots = AdapterSlots(AttachedEngine(engine.url, "m"), tmp_path / "adapters", 2)
    good, other = archive(tmp_path, 1), archive(tmp_path, 2)

    async def fetch(_sha: str) -> bytes:
        return other  # what a tampered channel would hand over

    with pytest.raises(AdapterRefused, match="hash"):
        async with slots.use(digest(good), fetch):
            pass
    assert engine.calls == []  # nothing loaded
    assert not (tmp_path / "adapters" / digest(good)).exists()  # nothing kept
    with pytest.raises(AdapterError, match="cannot be fetched"):
        async with slots.use(digest(good), None):
            pass


async def test_the_least_recently_used_idle_adapter_makes_room_and_busy_ones_never(
    tmp_path: Path, engine: Engine
) -> None:
    changes: list[int] = []
    slots = AdapterSlots(AttachedEngine(engine.url, "m"), tmp_path / "adapters", 2,
                         on_change=lambda: changes.append(1), tag="node")  # fmt: skip
    archives = {digest(a): a for a in (archive(tmp_path, i) for i in (1, 2, 3))}
    one, two, three = archives

    async def fetch(sha: str) -> bytes:
        return archives[sha]

    for sha in (one, two, one):  # `one` used last: `two` is the least recently used
        async with slots.use(sha, fetch) as name:
            assert name == f"node-{sha}"
    async with slots.use(three, fetch):
        pass
    assert engine.calls == [("load_lora_adapter", f"node-{one}"),
                            ("load_lora_adapter", f"node-{two}"),
                            ("unload_lora_adapter", f"node-{two}"),
                            ("load_lora_adapter", f"node-{three}")]  # fmt: skip
    assert sorted(slots.held()) == sorted([one, three])
    assert slots.cold_loads == 3
    assert changes  # the coordinators are told
    # both slots busy with running jobs: a third adapter waits for nobody, the node is full
    async with slots.use(one, fetch), slots.use(three, fetch):
        with pytest.raises(AdapterSlotsFull):
            async with slots.use(two, fetch):
                pass


async def test_a_job_arriving_while_its_adapter_is_unloaded_gets_it_loaded_again(
    tmp_path: Path, engine: Engine
) -> None:
    slots = AdapterSlots(AttachedEngine(engine.url, "m"), tmp_path / "adapters", 2)
    archives = {digest(a): a for a in (archive(tmp_path, i) for i in (1, 2, 3))}
    one, two, three = archives

    async def fetch(sha: str) -> bytes:
        return archives[sha]

    for sha in (one, two):
        async with slots.use(sha, fetch):
            pass
    engine.unload_delay_s = 0.3  # `one` is being unloaded to make room for `three` …
    making_room = asyncio.create_task(_hold(slots, three, fetch))
    await asyncio.sleep(0.1)
    async with slots.use(one, fetch):  # … when a job for `one` arrives
        last = [action for action, name in engine.calls if name == one][-1]
        assert last == "load_lora_adapter"  # the engine knows the name the job will send
    await making_room


async def _hold(slots: AdapterSlots, sha: str, fetch: Any) -> None:
    async with slots.use(sha, fetch):
        pass
