"""Cached-prompt pricing on a real vLLM engine: the engine's own count of prompt tokens found in
its prefix cache (`--enable-prompt-tokens-details`) reaches the client's usage, the signed
receipt and the bill at the node's advertised cached price; a node that claims more cached
tokens than it had only lowers its own pay; a node that hides its hits (billing them at the
full price) is caught by the spot check's cache probe, and an honest one is not accused."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agora.receipts import statement_total
from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from billing.ledger import provider_account
from protocol.identity import Identity
from protocol.receipt_document import verify_document
from worker_node.config import ModelConfig
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.faults import ALLOW_ENV, ALLOW_VALUE, FAULT_ENV
from worker_node.node import make_engine

pytestmark = pytest.mark.engine
MODEL = "tiny-cache"
PRICE_IN, PRICE_OUT, CACHED_IN = 100_000, 200_000, 25_000
NODES = {"honest": None, "hider": "hide-cache-hits", "overstater": "overstate-cache-hits"}


@dataclass
class Stage:
    coordinator: CoordinatorHandle
    node_ids: dict[str, str]
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def chat(self, node: str, prompt: str) -> dict[str, Any]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 4, "temperature": 0,
                "provider": {"order": [self.node_ids[node]], "allow_fallbacks": False}}  # fmt: skip
        response = httpx.post(f"{self.coordinator.base_url}/chat/completions", json=body,
                              headers=self.headers, timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        value: dict[str, Any] = response.json()
        return value

    def receipt(self, request_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.coordinator.base_url}/receipts/{request_id}",
                             headers=self.headers, timeout=30)  # fmt: skip
        assert response.status_code == 200, response.text
        value: dict[str, Any] = response.json()
        return value

    def earned(self, node: str) -> int:
        return self.coordinator.balances().get(provider_account(self.node_ids[node]), 0)

    def evidence(self, node: str) -> dict[str, int]:
        with self.coordinator.admin() as admin:
            events = admin.get("/trust/events", params={"node_id": self.node_ids[node]})
        counts: dict[str, int] = events.json()["counts"]
        return counts


@pytest.fixture(scope="module")
def stage(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    workdir = tmp_path_factory.mktemp("cached-pricing")
    engine = VllmEngine(
        VllmConfig(
            model=str(tiny_model), served_model=MODEL, max_model_len=1024, dtype="bfloat16",
            enforce_eager=True, log_path=workdir / "engine.log", startup_timeout_s=600,
            extra_args=("--enable-prompt-tokens-details",),  # what a node adds to its engines
        )
    )  # fmt: skip
    asyncio.run(engine.start())
    coordinator = start_coordinator(workdir, env={
        "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
        "AGORA_COORDINATOR_SPOT_CHECK_RATE": "1",  # every job is checked (and its cache probed)
        "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "1",
    })  # fmt: skip
    workers: list[Process] = []
    try:
        for name, fault in NODES.items():
            env = {FAULT_ENV: fault, ALLOW_ENV: ALLOW_VALUE} if fault else {}
            workers.append(start_worker(workdir, coordinator, WorkerSpec(
                name=name, served_model=MODEL, engine_url=engine.base_url, engine_model=MODEL,
                price_in=PRICE_IN, price_out=PRICE_OUT, env=env,
                extra_args=["--price-cached-in", str(CACHED_IN)],
            )))  # fmt: skip
        key = coordinator.create_client("cache-client", 10**12)
        wait_for_workers(coordinator, key, MODEL, len(NODES), workers, timeout_s=120)
        node_ids = {n: Identity.load(workdir / f"{n}.key").node_id for n in NODES}
        yield Stage(coordinator, node_ids, key)
    finally:
        for w in workers:
            w.stop()
        coordinator.process.stop()
        asyncio.run(engine.stop())


def long_prompt() -> str:
    """About 400 tokens no other request sent (several of the engine's 128-token blocks)."""
    return "Ledger codes: " + " ".join(uuid.uuid4().hex for _ in range(12))


def provider_pay(prompt: int, cached: int, completion: int) -> int:
    exact = (prompt - cached) * PRICE_IN + cached * CACHED_IN + completion * PRICE_OUT
    return -(-exact // 1_000_000)


def until(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_cached_price_is_advertised(stage: Stage) -> None:
    models = httpx.get(f"{stage.coordinator.base_url}/models", headers=stage.headers).json()
    [card] = [m for m in models["data"] if m["id"] == MODEL]
    assert card["pricing"]["cached_prompt_per_mtok"] == CACHED_IN * 105 // 100  # + 5 % fee
    with stage.coordinator.admin() as admin:
        workers = admin.get("/workers").json()["workers"]
    assert {w["models"][MODEL]["price_cached_prompt_per_mtok"] for w in workers} == {CACHED_IN}


def test_a_repeated_prompt_is_billed_at_the_cached_price(stage: Stage) -> None:
    prompt = long_prompt()
    first = stage.chat("honest", prompt)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    before = stage.earned("honest")
    again = stage.chat("honest", prompt)
    usage = again["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 128  # the engine found at least one full block of the same prompt
    assert cached < usage["prompt_tokens"]

    document = stage.receipt(again["id"])
    assert document["receipt"]["cached_prompt_tokens"] == cached  # signed by the worker
    assert document["receipt"]["price_cached_prompt_per_mtok"] == CACHED_IN
    verified = verify_document(document)  # `agora receipt verify`
    assert statement_total(verified.statement) == verified.amount_total
    pay = provider_pay(usage["prompt_tokens"], cached, usage["completion_tokens"])
    assert pay < provider_pay(usage["prompt_tokens"], 0, usage["completion_tokens"])
    until(lambda: stage.earned("honest") - before == pay)


def test_over_reporting_cached_tokens_only_lowers_the_workers_pay(stage: Stage) -> None:
    honest_before, over_before = stage.earned("honest"), stage.earned("overstater")
    honest = stage.chat("honest", long_prompt())  # new prompts: nothing cached, honestly
    over = stage.chat("overstater", long_prompt())
    claimed = over["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert claimed == over["usage"]["prompt_tokens"]  # it claims the whole prompt was cached
    assert stage.receipt(over["id"])["receipt"]["cached_prompt_tokens"] == claimed
    until(lambda: stage.earned("overstater") > over_before)
    until(lambda: stage.earned("honest") > honest_before)
    over_pay = stage.earned("overstater") - over_before
    honest_pay = stage.earned("honest") - honest_before
    u = over["usage"]
    assert over_pay == provider_pay(u["prompt_tokens"], claimed, u["completion_tokens"])
    h = honest["usage"]
    assert honest_pay == provider_pay(h["prompt_tokens"], 0, h["completion_tokens"])
    assert over_pay < honest_pay


def test_hidden_cache_hits_are_caught_by_the_cache_probe(stage: Stage) -> None:
    stage.chat("honest", long_prompt())  # probed too: it must not be accused
    stage.chat("hider", long_prompt())
    until(lambda: stage.evidence("hider").get("cache_hidden", 0) >= 1)
    honest = stage.evidence("honest")
    assert "cache_hidden" not in honest, honest


def test_a_spawned_engine_reports_cached_tokens() -> None:
    """A node starts every vLLM engine it spawns with prompt-token details on (else its hits
    never reach a receipt, and its cached price sells nothing)."""
    engine = make_engine(ModelConfig(name="m", model="/models/m"), Path("/tmp/state"))
    assert isinstance(engine, VllmEngine)
    assert "--enable-prompt-tokens-details" in engine.config.extra_args
