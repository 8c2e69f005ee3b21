"""300 concurrent streamed requests on a small balance, through the real market: the balance
never goes below zero, refused requests cost nothing (402 before any work), and what the
client lost is exactly what its receipts say it paid."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agora.stack import WorkerSpec, start_coordinator, start_worker, wait_for_workers
from billing.ledger import client_account
from coordinator.services.audit import audit_ledger
from coordinator.store import holds_store
from coordinator.store.db import make_engine
from tests.conftest import MODEL, Market
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
CREDIT = 60  # micro-units: about ten requests' worst case at a time
SHARED_CREDIT = 1500  # ~200 of 300 worst cases: more than one replica's half, not all


async def stream_one(client: httpx.AsyncClient) -> tuple[int, str | None]:
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    async with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            assert response.status_code == 402, error
            assert error["code"] == "insufficient_quota"
            return 402, None
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert '"error"' not in lines[-2], lines[-2]
        return 200, response.headers["x-agora-request-id"]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_market(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Market]:
    """The suite's market (SQLite), or one just like it whose coordinator keeps its books in a
    fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield request.getfixturevalue("market")
        return
    engine: VllmEngine = request.getfixturevalue("vllm_engine")
    tiny_model: Path = request.getfixturevalue("tiny_model")
    database_url: str = request.getfixturevalue("database_url_postgresql")
    env = {
        "AGORA_COORDINATOR_DATABASE_URL": database_url,
        "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(tiny_model)}),
    }
    coordinator = start_coordinator(tmp_path, env=env)
    worker = start_worker(
        tmp_path, coordinator, WorkerSpec("pg-worker", MODEL, engine_url=engine.base_url)
    )
    try:
        key = coordinator.create_client("readiness", 1)
        wait_for_workers(coordinator, key, MODEL, 1, [worker], timeout_s=120)
        yield Market(coordinator, worker, tmp_path)
    finally:
        worker.stop()
        coordinator.process.stop()
    db = make_engine(database_url)
    try:
        assert audit_ledger(db) == []
    finally:
        db.dispose()


def test_concurrent_streams_never_overdraw_and_bill_exactly(any_market: Market) -> None:
    market = any_market
    name, key = market.new_client(credit=CREDIT)

    async def run() -> list[tuple[int, str | None]]:
        async with httpx.AsyncClient(
            base_url=market.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
            limits=httpx.Limits(max_connections=300),
        ) as client:  # fmt: skip
            return await asyncio.gather(*(stream_one(client) for _ in range(300)))

    outcomes = asyncio.run(run())
    served = [rid for status, rid in outcomes if status == 200]
    refused = sum(1 for status, _ in outcomes if status == 402)
    assert served, "some requests must fit in the credit"
    assert refused, "300 at once cannot all fit in the credit"
    assert len(served) + refused == 300
    balance = market.coordinator.balances()[client_account(name)]
    assert balance >= 0
    paid = 0
    with httpx.Client(base_url=market.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
        for rid in served:
            receipt = c.get(f"/receipts/{rid}")
            assert receipt.status_code == 200, receipt.text
            paid += receipt.json()["amount_total"]
    assert CREDIT - balance == paid  # every micro-unit accounted for, nothing for the 402s


def test_two_replicas_on_one_postgresql_never_overdraw_and_bill_exactly(
    vllm_engine: VllmEngine, tiny_model: Path, database_url_postgresql: str, tmp_path: Path
) -> None:
    """Scale-out: two coordinator processes share one PostgreSQL (each with its own worker on
    the shared engine); 300 requests at once, alternating between them, on one small balance."""
    env = {
        "AGORA_COORDINATOR_DATABASE_URL": database_url_postgresql,
        "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(tiny_model)}),
    }
    replicas, workers = [], []
    try:
        for name in ("replica-a", "replica-b"):
            coordinator = start_coordinator(tmp_path / name, env=env)
            replicas.append(coordinator)
            spec = WorkerSpec(f"{name}-worker", MODEL, engine_url=vllm_engine.base_url)
            workers.append(start_worker(tmp_path / name, coordinator, spec))
        key = replicas[0].create_client("readiness", 1)
        for coordinator, worker in zip(replicas, workers, strict=True):
            wait_for_workers(coordinator, key, MODEL, 1, [worker], timeout_s=120)
        name = "two-replica-client"
        key = replicas[0].create_client(name, SHARED_CREDIT)  # one account, both replicas

        async def run() -> list[tuple[int, str | None]]:
            clients = [
                httpx.AsyncClient(
                    base_url=r.base_url,
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=120,
                    limits=httpx.Limits(max_connections=300),
                )
                for r in replicas
            ]
            try:
                return await asyncio.gather(*(stream_one(clients[i % 2]) for i in range(300)))
            finally:
                for c in clients:
                    await c.aclose()

        outcomes = asyncio.run(run())
        served = [(i % 2, rid) for i, (status, rid) in enumerate(outcomes) if status == 200]
        refused = sum(1 for status, _ in outcomes if status == 402)
        assert {replica for replica, _ in served} == {0, 1}, "both replicas served requests"
        assert refused, "300 at once cannot all fit in the credit"
        assert len(served) + refused == 300
        time.sleep(1)  # the last hold releases are fire-and-forget
        balances = replicas[1].balances()
        balance = balances[client_account(name)]
        assert balance >= 0
        paid = 0
        for replica, rid in served:
            with httpx.Client(base_url=replicas[replica].base_url,
                              headers={"Authorization": f"Bearer {key}"}) as c:  # fmt: skip
                receipt = c.get(f"/receipts/{rid}")
            assert receipt.status_code == 200, receipt.text
            paid += receipt.json()["amount_total"]
        assert SHARED_CREDIT - balance == paid  # every micro-unit, across both replicas
        assert sum(balances.values()) == 0
    finally:
        for proc in workers:
            proc.stop()
        for coordinator in replicas:
            coordinator.process.stop()
    db = make_engine(database_url_postgresql)
    try:
        assert audit_ledger(db) == []
        with db.connect() as conn:
            assert holds_store.held_by(conn, name) == 0  # every hold released
    finally:
        db.dispose()
