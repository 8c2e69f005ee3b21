"""A node holding sessions with two coordinators (as `--discover` does): each coordinator hears,
in heartbeats sent as soon as the count changes, the jobs the node runs for the other, and
counts them against the node's slots, so neither admits more than the engine was offered for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agora.stack import CoordinatorHandle, start_coordinator
from protocol.advert import Advert, ModelOffer
from protocol.identity import Identity
from protocol.market import CoordinatorRecord
from protocol.proto import session_pb2 as pb
from tests.conftest import MODEL
from tests.faults import FaultProxy
from tests.fleet import FAST
from worker_node.asks import Asks
from worker_node.engine_client import EngineClients
from worker_node.engines.attach import AttachedEngine
from worker_node.engines.vllm import VllmEngine
from worker_node.jobs import JobRunner
from worker_node.session import SessionConfig, WorkerSession
from worker_node.session_pool import SessionPool

pytestmark = pytest.mark.engine

HELD_S = 8.0  # how long the engine (through the proxy) holds the job sent to coordinator A
# heartbeats every 5 s: the count must arrive through the early beat a job start asks for
ENV = {**FAST, "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "5"}


@dataclass
class KnownCoordinators:
    """Discovery stand-in: the DHT path is tested in tests/test_p2p_market.py."""

    records: list[CoordinatorRecord]

    async def find(self, exclude: set[str]) -> list[CoordinatorRecord]:
        return [r for r in self.records if r.coordinator_id not in exclude]

    async def forget(self, coordinator_id: str) -> None:
        return None


def record_of(name: str, coordinator: CoordinatorHandle) -> CoordinatorRecord:
    now = time.time_ns() // 1_000_000
    return CoordinatorRecord(name, coordinator.grpc_target, coordinator.base_url, (MODEL,),
                             now, now + 600_000)  # fmt: skip


async def slot_view(coordinator: CoordinatorHandle, node_id: str) -> dict[str, Any] | None:
    admin_url = coordinator.base_url.removesuffix("/v1") + "/admin/v1/workers"
    headers = {"Authorization": f"Bearer {coordinator.admin_token}"}
    async with httpx.AsyncClient(timeout=10) as http:
        workers = (await http.get(admin_url, headers=headers)).json()["workers"]
    worker = next((w for w in workers if w["node_id"] == node_id), None)
    return dict(worker["models"][MODEL]) if worker else None


async def until(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.1)


async def ask(coordinator: CoordinatorHandle, key: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(
            f"{coordinator.base_url}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
        )


@dataclass
class TwoSessions:
    a: CoordinatorHandle
    b: CoordinatorHandle
    node_id: str
    proxy: FaultProxy


@pytest.fixture
async def two_sessions(vllm_engine: VllmEngine, tmp_path: Path) -> AsyncIterator[TwoSessions]:
    a = start_coordinator(tmp_path / "a", env=ENV)
    b = start_coordinator(tmp_path / "b", env=ENV)
    proxy = FaultProxy(vllm_engine.base_url).start()
    identity = Identity.generate()
    offer = ModelOffer(MODEL, 1, 1, 1)  # one slot, shared by both coordinators

    def advert(_coordinator: str = "") -> Advert:
        return Advert(identity.node_id, time.time_ns() // 1_000_000, (offer,))

    async def heartbeat() -> pb.Heartbeat:
        return pb.Heartbeat(loads=[pb.ModelLoad(model=MODEL, available=True)])

    stop = asyncio.Event()
    async with EngineClients(1) as http:
        engine = AttachedEngine(proxy.base_url, MODEL)
        runner = JobRunner(identity, {MODEL: engine}, Asks.fixed({MODEL: offer}), http)

        def session(target: str) -> WorkerSession:
            config = SessionConfig(target, give_up_after=2)
            return WorkerSession(identity, advert, runner, config, heartbeat=heartbeat)

        finder = KnownCoordinators([record_of("a", a), record_of("b", b)])
        pool = SessionPool(finder, session, max_coordinators=2)
        serving = asyncio.create_task(pool.run(stop))
        try:
            for coordinator in (a, b):
                await until("registered", lambda c=coordinator: slot_view(c, identity.node_id), 30)
            yield TwoSessions(a, b, identity.node_id, proxy)
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
            await engine.stop()
            proxy.stop()
            a.process.stop()
            b.process.stop()


async def test_each_coordinator_counts_the_jobs_the_node_runs_for_the_other(
    two_sessions: TwoSessions,
) -> None:
    market = two_sessions
    key_a = market.a.create_client("client-a", 10**12)
    key_b = market.b.create_client("client-b", 10**12)
    market.proxy.first_byte_delay_s = HELD_S
    held = asyncio.create_task(ask(market.a, key_a))

    async def b_sees_it() -> bool:
        view = await slot_view(market.b, market.node_id)
        return view is not None and view["jobs_elsewhere"] == 1

    await until("B hears of A's job", b_sees_it, HELD_S / 2)
    at_b = await slot_view(market.b, market.node_id)
    at_a = await slot_view(market.a, market.node_id)
    assert at_b is not None
    assert at_a is not None
    assert (at_b["in_flight"], at_b["jobs_elsewhere"]) == (1, 1)  # the slot is taken, not by B
    assert (at_a["in_flight"], at_a["jobs_elsewhere"]) == (1, 0)

    refused = await ask(market.b, key_b)  # B would over-admit if it counted only its own jobs
    assert not held.done()
    assert refused.status_code == 503, refused.text
    assert "at_capacity" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"]

    market.proxy.first_byte_delay_s = 0.0
    assert (await held).status_code == 200

    async def b_sees_it_end() -> bool:
        view = await slot_view(market.b, market.node_id)
        return view is not None and view["jobs_elsewhere"] == 0

    await until("B hears the job ended", b_sees_it_end, HELD_S / 2)
    served = await ask(market.b, key_b)
    assert served.status_code == 200, served.text
    assert served.headers["x-agora-worker"] == market.node_id
