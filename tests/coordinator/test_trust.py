"""Cheating must not pay: real workers in clearly named fault modes, on real engines, against
a real coordinator. Provable fraud (a replayed receipt, billing output never delivered, output
that fails a spot check) quarantines the worker, slashes its bond, claws back its unpaid
earnings and refunds its clients; unprovable misbehaviour (bad signatures, over-claimed tokens)
goes unpaid and sinks its reputation until it is quarantined; slowness costs reputation and
traffic, never money. Honest sampled work is never accused.

The engines serve *peaked* tiny models (worker_node.tiny_model --peaked): a random model's
next-token distribution is nearly flat, where made-up tokens are as plausible as sampled ones
and a sampled-output check has nothing to go on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
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
from billing.ledger import bond_account, client_account, provider_account
from protocol.identity import Identity
from tests.conftest import books_problems
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.faults import ALLOW_ENV, ALLOW_VALUE, FAULT_ENV
from worker_node.tiny_model import ensure_tiny_model

pytestmark = pytest.mark.engine
MODEL = "tiny-t"
BOND = 5_000_000
SLASH = 1_000_000
CREDIT = 10**9
PROMPT = "The keeper climbed the stairs and"
SLO_ITL_S = 0.1  # the slow fault holds each streamed token 0.2 s


class Market:
    def __init__(self, workdir: Path, engine: VllmEngine, model_dir: Path) -> None:
        self.workdir, self.engine = workdir, engine
        env = {
            "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(model_dir)}),
            "AGORA_COORDINATOR_SLO_ITL_S": str(SLO_ITL_S),
            "AGORA_COORDINATOR_SLASH_AMOUNT": str(SLASH),
            "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
            "AGORA_COORDINATOR_SPOT_CHECK_RATE": "1",  # every checkable job is checked
            "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "1",
        }
        self.coordinator: CoordinatorHandle = start_coordinator(workdir, env=env)
        self.workers: dict[str, Process] = {}
        self.node_ids: dict[str, str] = {}  # worker name -> node id

    def add(self, name: str, fault: str | None = None, engine: VllmEngine | None = None) -> str:
        env = {FAULT_ENV: fault, ALLOW_ENV: ALLOW_VALUE} if fault else {}
        engine = engine or self.engine
        spec = WorkerSpec(
            name, MODEL, engine_url=engine.base_url, engine_model=engine.config.served_model,
            env=env,
        )  # fmt: skip
        self.workers[name] = start_worker(self.workdir, self.coordinator, spec)
        key = self.workdir / f"{name}.key"
        deadline = time.monotonic() + 30
        while not key.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.node_ids[name] = Identity.load(key).node_id
        return self.node_ids[name]

    def wait(self, count: int) -> None:
        key = self.coordinator.create_client(f"probe-{count}-{time.monotonic_ns()}", 1)
        procs = list(self.workers.values())
        wait_for_workers(self.coordinator, key, MODEL, count, procs, timeout_s=120)

    def wait_for(self, name: str, timeout_s: float = 120.0) -> str:
        """Until worker `name` itself is registered and routable; its node id. Not "until N
        workers serve the model": this market lives for the whole module and keeps the honest
        workers earlier tests added, so a count can be met before `name` has registered."""
        node, process = self.node_ids[name], self.workers[name]
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.alive(), f"{name} exited:\n{process.log_tail()}"
            workers = self.admin("GET", "/workers")["workers"]
            if any(w["node_id"] == node and w["models"].get(MODEL, {}).get("available")
                   for w in workers):  # fmt: skip
                return node
            assert time.monotonic() < deadline, f"{name} not routable after {timeout_s:.0f} s"
            time.sleep(0.1)

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.coordinator.admin() as admin:
            response = admin.request(method, path, **kwargs)
            response.raise_for_status()
            return response.json()

    def worker(self, node_id: str) -> dict[str, Any]:
        return next(w for w in self.admin("GET", "/workers")["workers"] if w["node_id"] == node_id)

    def balance(self, account: str) -> int:
        return self.coordinator.balances().get(account, 0)

    def stop(self) -> None:
        for process in self.workers.values():
            process.stop()
        self.coordinator.process.stop()


def _engine(size: str, served: str, log_dir: Path) -> VllmEngine:
    return VllmEngine(
        VllmConfig(
            model=str(ensure_tiny_model(size, peaked=True)), served_model=served,
            max_model_len=512, dtype="float32", enforce_eager=True,
            log_path=log_dir / "engine.log", startup_timeout_s=600,
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def peaked_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    """The market's model: the tiny Llama with a sharp, trained-like distribution."""
    engine = _engine("tiny", "tiny-peaked", tmp_path_factory.mktemp("tiny-peaked"))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@pytest.fixture(scope="module")
def market(peaked_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    workdir = tmp_path_factory.mktemp("trust")
    market = Market(workdir, peaked_engine, ensure_tiny_model("tiny", peaked=True))
    try:
        market.add("honest")
        market.wait(1)
        yield market
    finally:
        market.stop()
    assert books_problems(workdir) == []  # refunds, clawbacks and slashes keep the books sound


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    """A second real engine serving a different model (another architecture, same tokenizer):
    what a worker serving the wrong model under the advertised name runs."""
    engine = _engine("small", "small", tmp_path_factory.mktemp("small"))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


def cheater(market: Market, name: str, fault: str | None, engine: VllmEngine | None = None) -> str:
    market.add(name, fault, engine)
    node = market.wait_for(name)  # quarantined cheaters are not available, honest-2 may be
    market.admin("POST", f"/nodes/{node}/bond", json={"amount": BOND})
    return node


def ask(
    market: Market, key: str, node: str, *, stream: bool = False, temperature: float = 0.0
) -> str:
    """One request pinned to `node`; its request id."""
    body: dict[str, Any] = {
        "model": MODEL, "prompt": PROMPT, "max_tokens": 10 if temperature == 0 else 24,
        "temperature": temperature, "ignore_eos": True, "stream": stream,
        "provider": {"order": [node], "allow_fallbacks": False},
    }  # fmt: skip
    with httpx.Client(base_url=market.coordinator.base_url, timeout=120) as client:
        response = client.post(
            "/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        return str(response.headers["x-agora-request-id"])


def until(condition: Any, timeout_s: float = 20.0, state: Any = None) -> None:
    """Wait for `condition`; on a time-out, say what `state()` shows (what was seen instead)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out; {state() if state else ''}"
        time.sleep(0.1)


def quarantined(market: Market, node: str) -> str | None:
    reason: str | None = market.worker(node)["quarantined"]
    return reason


@pytest.mark.parametrize(
    ("fault", "stream", "proof"),
    [
        ("replay-receipt", False, "request_id"),  # its second job carries the first's receipt
        ("drop-midstream-but-bill", True, "output_sha256"),  # billed the undelivered rest
    ],
)
def test_provable_fraud_is_quarantined_slashed_clawed_back_and_refunded(
    market: Market, fault: str, stream: bool, proof: str
) -> None:
    node = cheater(market, f"cheat-{fault}", fault)
    name = f"victim-{fault}"
    key = market.coordinator.create_client(name, CREDIT)
    ask(market, key, node, stream=stream)
    if fault == "replay-receipt":
        assert quarantined(market, node) is None  # its first receipt was genuine
        ask(market, key, node, stream=stream)
    until(lambda: quarantined(market, node) is not None)
    reason = quarantined(market, node)
    assert reason is not None
    assert proof in reason
    until(lambda: market.balance(client_account(name)) == CREDIT)  # every request refunded
    assert market.balance(bond_account(node)) == BOND - SLASH
    assert market.balance(provider_account(node)) == 0  # nothing left to pay out
    assert market.worker(node)["models"][MODEL]["available"] is False
    with httpx.Client(base_url=market.coordinator.base_url, timeout=60) as client:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4,
                "provider": {"order": [node], "allow_fallbacks": False}}  # fmt: skip
        refused = client.post("/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 503  # never routed to again
        body["provider"] = {"order": [node]}
        served = client.post("/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert served.status_code == 200
        assert served.headers["x-agora-worker"] != node


def established_reference(market: Market) -> str:
    """The honest worker, off probation: only then may it referee a newcomer's work."""
    key = market.coordinator.create_client(f"referee-{time.monotonic_ns()}", CREDIT)
    honest = market.node_ids["honest"]
    while market.worker(honest)["reputation"]["probation"]:
        ask(market, key, honest)
    return honest


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_made_up_text_fails_its_spot_check_and_is_punished(
    market: Market, temperature: float
) -> None:
    """garbage-text signs consistent receipts for text the model never produced: only a spot
    check (the claimed tokens re-scored on the honest worker) can prove it, greedy or sampled.
    The recount may flag the claim first (its random words re-encode to fewer tokens than it
    claims: an unproven quarantine, no slash); the spot check's proof then supersedes it."""
    established_reference(market)
    node = cheater(market, f"cheat-garbage-{temperature}", "garbage-text")
    name = f"victim-garbage-{temperature}"
    key = market.coordinator.create_client(name, CREDIT)
    ask(market, key, node, temperature=temperature)  # caught on its first checked job
    until(lambda: "spot check" in (quarantined(market, node) or ""))
    until(lambda: market.balance(client_account(name)) == CREDIT)
    assert market.balance(bond_account(node)) == BOND - SLASH


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_worker_serving_another_model_fails_its_spot_check(
    market: Market, other_engine: VllmEngine, temperature: float
) -> None:
    """wrong-model: an honest-looking node whose engine runs a different model."""
    established_reference(market)
    node = cheater(market, f"cheat-wrong-model-{temperature}", None, other_engine)
    name = f"victim-wrong-model-{temperature}"
    key = market.coordinator.create_client(name, CREDIT)
    ask(market, key, node, temperature=temperature)
    until(lambda: quarantined(market, node) is not None)
    assert "spot check" in (quarantined(market, node) or "")
    until(lambda: market.balance(client_account(name)) == CREDIT)
    assert market.balance(bond_account(node)) == BOND - SLASH


@pytest.mark.parametrize(
    ("fault", "requests"), [("bad-signature", 1), ("inflate-tokens", 1)]
)  # fmt: skip
def test_unprovable_cheating_is_unpaid_or_billed_down_and_sinks_into_quarantine(
    market: Market, fault: str, requests: int
) -> None:
    node = cheater(market, f"cheat-{fault}", fault)
    key = market.coordinator.create_client(f"client-{fault}", CREDIT)
    for _ in range(requests):
        ask(market, key, node)
    until(lambda: quarantined(market, node) is not None)
    reputation = market.worker(node)["reputation"]
    assert reputation["score"] < 0.5  # below a newcomer's (a passed spot check may follow)
    assert reputation["bad"] >= 10
    assert market.balance(bond_account(node)) == BOND  # no proof, no slash
    if fault == "bad-signature":
        assert market.balance(provider_account(node)) == 0  # never paid
    else:
        mismatches = market.admin("GET", "/metering/mismatches")["mismatches"]
        assert any(m["worker_id"] == node for m in mismatches)


CHECKED = 500  # honest sampled jobs that must pass their spot check
HONEST = frozenset({"served", "verified", "slow"})  # slow: CI machines may miss the tight SLO


def evidence(market: Market, node: str) -> dict[str, int]:
    counts: dict[str, int] = market.admin("GET", "/trust/events", params={"node_id": node})[
        "counts"
    ]
    return counts


def test_honest_sampled_work_is_never_accused(market: Market) -> None:
    """500+ honest jobs sampled at temperatures 0.7-1.0 (chat and completions, streamed or
    not), every one spot-checked on another honest worker: no accusation, no quarantine."""
    established_reference(market)
    market.add("honest-2")
    honest = market.wait_for("honest-2")
    key = market.coordinator.create_client("sampler", CREDIT)
    provider = {"order": [honest], "allow_fallbacks": False}

    def one(client: openai.OpenAI, i: int) -> None:
        temperature, extra = (0.7, 0.8, 0.9, 1.0)[i % 4], {"provider": provider}
        if i % 3 == 0:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Story {i}"}],
                max_tokens=16, temperature=temperature, seed=i, extra_body=extra,
            )  # fmt: skip
        else:
            stream = client.completions.create(
                model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=16, temperature=temperature,
                top_p=1.0 if i % 2 else 0.95, stream=i % 3 == 1, extra_body=extra,
            )  # fmt: skip
            if i % 3 == 1:
                for _chunk in stream:
                    pass

    sent = 0
    with (
        openai.OpenAI(base_url=market.coordinator.base_url, api_key=key) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        while evidence(market, honest).get("verified", 0) < CHECKED:
            assert sent < 2 * CHECKED, f"only {evidence(market, honest)} after {sent} jobs"
            list(pool.map(lambda i: one(client, i), range(sent, sent + 100)))
            sent += 100
            time.sleep(1)  # let the last checks land
    counts = evidence(market, honest)
    assert set(counts) <= HONEST, counts  # not one fraud, rejected receipt or over-claim
    assert quarantined(market, honest) is None
    assert market.worker(honest)["reputation"]["score"] > 0.9
    mismatches = market.admin("GET", "/metering/mismatches")["mismatches"]
    assert all(m["worker_id"] != honest for m in mismatches)


def recent_slow(market: Market, node: str) -> dict[str, Any]:
    """The node's evidence and its last jobs' measured latencies (why a job was or was not
    slow), for a time-out's message."""
    trace = market.admin("GET", "/trust/events", params={"node_id": node})
    return {"counts": trace["counts"], "events": trace.get("events", [])[:8]}


def test_a_slow_worker_loses_reputation_and_traffic_but_no_money(market: Market) -> None:
    """slow: each streamed token waits 0.2 s, over the market's 0.1 s inter-token objective.

    It is measured against a twin: an honest newcomer on the same engine, added with it and
    given the same jobs, so the two differ only in the fault. Routing then chooses between
    just these two for a client that asks for the fastest answer (sort by latency: measured
    time to first token plus inter-token latency per token). The workers earlier tests left
    (honest, honest-2) are left out: their latency and failure records depend on what those
    tests happened to send. The default sort is not used either: it weighs time to first
    token only (0.2 s apart here), which one hiccup of the twin's on a busy machine outweighs,
    while the inter-token latency is ten times the twin's on every token."""
    established_reference(market)
    node = cheater(market, "slow", "slow")
    market.add("slow-twin")
    twin = market.wait_for("slow-twin")
    key = market.coordinator.create_client("slow-client", CREDIT)
    for i in range(1, 4):  # pinned: served, paid, spot-checked; the slow one misses the SLO
        for worker in (node, twin):
            ask(market, key, worker, stream=True)
            # one job at a time: its spot check (on the shared engine) must not slow the next
            until(lambda w=worker, n=i: evidence(market, w).get("verified", 0) == n)
    until(
        lambda: evidence(market, node).get("slow", 0) == 3, state=lambda: recent_slow(market, node)
    )
    assert market.worker(node)["reputation"]["bad"] == pytest.approx(3 * 0.3, abs=0.01)
    slot = market.worker(node)["models"][MODEL]
    assert slot["available"]  # eligible, not resting: below, it loses on merit alone
    assert not slot["cooldown_left_s"]
    # every other worker the coordinator knows, whatever earlier tests added
    known = [w["node_id"] for w in market.admin("GET", "/workers")["workers"]]
    others = [n for n in known if n not in (node, twin)]
    with httpx.Client(base_url=market.coordinator.base_url, timeout=120) as client:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                "provider": {"sort": "latency", "ignore": others}}  # fmt: skip
        for _ in range(5):  # free to choose between the two, routing goes to the faster one
            response = client.post(
                "/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
            route = response.headers.get("x-agora-route")
            assert response.headers["x-agora-worker"] == twin, route
    assert quarantined(market, node) is None  # slowness is not cheating
    assert market.balance(bond_account(node)) == BOND
    assert market.balance(provider_account(node)) > 0  # its work was paid


def test_a_fault_mode_is_refused_unless_explicitly_allowed(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agora", "worker", "--coordinator", "127.0.0.1:1",
         "--engine-url", "http://127.0.0.1:1/v1", "--served-model-name", "m",
         "--key", str(tmp_path / "k.key")],
        env={**_env(), FAULT_ENV: "garbage-text"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert ALLOW_ENV in result.stdout + result.stderr


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, ALLOW_ENV)}
