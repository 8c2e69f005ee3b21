from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from coordinator.app import Coordinator
from coordinator.config import CoordinatorSettings
from coordinator.store.db import make_engine, migrate
from tests.conftest import books_problems
from tests.fleet import Fleet
from worker_node.engines.vllm import VllmEngine

C_WORKERS = ("c1", "c2", "c3")
C_PRICE = (100_000, 200_000)
PRICES = {"cheap": (100_000, 200_000), "mid": (150_000, 300_000), "dear": (300_000, 600_000)}


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    """The coordinator's real parts in-process (no servers), for workers played through the
    worker-link seam (test_request_path.PlayedWorker)."""
    settings = CoordinatorSettings(
        data_dir=tmp_path, idle_token_timeout_s=0.3, first_token_timeout_s=1.0,
        queue_timeout_s=0.2, spot_check_rate=0.0, spot_check_probation_rate=0.0,
    )  # fmt: skip
    coordinator = Coordinator(settings)
    yield coordinator
    await coordinator.request_path.drain()  # postings still in the background
    coordinator.writer.close()
    coordinator.db.dispose()


@pytest.fixture(scope="session")
def fleet(
    vllm_engine: VllmEngine, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """One coordinator; on the real engine, each through its own fault proxy:
    - "tiny": cheap, mid, dear (different prices) for routing
    - "tiny-c": c1, c2, c3 (same price) for failover and continuation: one can be killed and
      restarted while two others serve
    - "tiny-solo": solo (one slot) for capacity
    - "tiny-x": none at first; tests add workers that cheat (and get quarantined) here
    """
    pinned = {model: str(tiny_model) for model in ("tiny", "tiny-c", "tiny-solo", "tiny-x")}
    env = {"AGORA_COORDINATOR_TOKENIZERS": json.dumps(pinned)}  # the network recounts tokens
    fleet = Fleet.start(tmp_path_factory.mktemp("fleet"), vllm_engine.base_url, env)
    try:
        for name, (price_in, price_out) in PRICES.items():
            fleet.add(name, "tiny", price_in, price_out)
        for name in C_WORKERS:
            fleet.add(name, "tiny-c", *C_PRICE)
        fleet.add("solo", "tiny-solo", 100_000, 200_000, max_concurrency=1)
        fleet.wait("tiny", 3)
        fleet.wait("tiny-c", len(C_WORKERS))
        fleet.wait("tiny-solo", 1)
        yield fleet
    finally:
        fleet.stop()
    assert books_problems(fleet.workdir) == []  # the books after every gateway test


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated store, on SQLite and on PostgreSQL (per `database_url`)."""
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()
