"""Prefix-aware routing across providers, on three real vLLM engines (one per node, so each
node's prefix cache, and its hit counters, are its own): a conversation's next turns land on
the node that served its first, and that node's engine counts the hits; a session key keeps a
conversation whose early turns changed; a hot prefix still spreads once its holder is busy."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from tests.conftest import MODEL
from worker_node.engines.vllm import VllmConfig, VllmEngine

pytestmark = pytest.mark.engine
NODES = ("n0", "n1", "n2")


@dataclass
class Stage:
    coordinator: CoordinatorHandle
    node_ids: dict[str, str]  # name -> node id
    key: str


@pytest.fixture(scope="module")
def stage(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    workdir = tmp_path_factory.mktemp("prefix")
    engines = [
        VllmEngine(
            VllmConfig(
                model=str(tiny_model),
                served_model=MODEL,
                max_model_len=1024,
                dtype="bfloat16",
                enforce_eager=True,
                log_path=workdir / f"engine-{name}.log",
                startup_timeout_s=600,
            )
        )
        for name in NODES
    ]

    async def start_all() -> None:
        await asyncio.gather(*(e.start() for e in engines))

    asyncio.run(start_all())
    coordinator = start_coordinator(workdir, env={
        "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(tiny_model)}),
        "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
        "AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
        "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0",
    })  # fmt: skip
    workers: list[Process] = []
    try:
        for name, engine in zip(NODES, engines, strict=True):
            workers.append(start_worker(workdir, coordinator, WorkerSpec(
                name=name, served_model=MODEL, engine_url=engine.base_url, engine_model=MODEL,
                max_concurrency=4,
            )))  # fmt: skip
        key = coordinator.create_client("prefix-client", 10**12)
        wait_for_workers(coordinator, key, MODEL, len(NODES), workers, timeout_s=120)
        node_ids = {
            name: json.loads((workdir / f"{name}-state" / "status.json").read_text())["node_id"]
            for name in NODES
        }
        ready = Stage(coordinator, node_ids, key)
        for node in node_ids.values():  # measured while warm: an engine's first jobs are slow
            for _ in range(3):
                chat(ready, [{"role": "user", "content": "Warm up."}], provider={"order": [node]})
        yield ready
    finally:
        for w in workers:
            w.stop()
        coordinator.process.stop()

        async def stop_all() -> None:
            await asyncio.gather(*(e.stop() for e in engines))

        asyncio.run(stop_all())


def system_prompt() -> dict[str, str]:
    """About 300 tokens that no other test sends (several of the engines' cache blocks)."""
    words = " ".join(uuid.uuid4().hex for _ in range(8))
    return {"role": "system", "content": f"You keep the market's books. Ledger codes: {words}"}


def chat(stage: Stage, messages: list[dict[str, str]], max_tokens: int = 8,
         **extra: Any) -> httpx.Response:  # fmt: skip
    headers = {"Authorization": f"Bearer {stage.key}", **extra.pop("headers", {})}
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            **extra}  # fmt: skip
    response = httpx.post(f"{stage.coordinator.base_url}/chat/completions", json=body,
                          headers=headers, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    return response


def hits(stage: Stage) -> dict[str, int]:
    """Each node's engine prefix-cache hits (tokens), as its heartbeats report them."""
    with stage.coordinator.admin() as admin:
        workers = admin.get("/workers").json()["workers"]
    return {w["node_id"]: int(w["models"][MODEL]["prefix_cache_hits"]) for w in workers}


def settled_hits(stage: Stage) -> dict[str, int]:
    """Hit counters once two heartbeats in a row agree (the engines' metrics have caught up)."""
    last = hits(stage)
    for _ in range(20):
        time.sleep(1.2)
        now = hits(stage)
        if now == last:
            return now
        last = now
    return last


def test_each_next_turn_lands_on_the_node_holding_its_conversation(stage: Stage) -> None:
    before = settled_hits(stage)
    holders: dict[int, str] = {}
    conversations: dict[int, list[dict[str, str]]] = {}
    for turn in range(3):
        for conversation in range(4):
            messages = conversations.setdefault(conversation, [system_prompt()])
            messages.append({"role": "user", "content": f"Question {turn}?"})
            if turn == 0:  # first turns placed on different nodes; after that routing decides
                node = stage.node_ids[NODES[conversation % len(NODES)]]
                response = chat(stage, messages, provider={"order": [node]})
            else:
                response = chat(stage, messages)
            worker = response.headers["X-Agora-Worker"]
            answer = response.json()["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": answer})
            if turn == 0:
                holders[conversation] = worker
            else:
                assert worker == holders[conversation], response.headers["X-Agora-Route"]
                chosen = response.headers["X-Agora-Route"].split("ranked=")[1].split(";")[0]
                assert ",cache=" in chosen, chosen  # the cache term, in the header
    assert len(set(holders.values())) == len(NODES)
    after = settled_hits(stage)
    gained = {node: after[node] - before.get(node, 0) for node in after}
    for conversation, node in holders.items():  # two later turns, each ~300 tokens cached
        assert gained[node] >= 256, (conversation, gained)


def test_a_session_key_keeps_a_conversation_whose_history_changed(stage: Stage) -> None:
    natural = chat(stage, [system_prompt()]).headers["X-Agora-Worker"]  # where routing goes
    elsewhere = next(n for n in stage.node_ids.values() if n != natural)
    session = f"conv-{uuid.uuid4().hex[:8]}"
    first = chat(stage, [system_prompt(), {"role": "user", "content": "Hi"}],
                 headers={"X-Agora-Session": session}, provider={"order": [elsewhere]})  # fmt: skip
    assert first.headers["X-Agora-Worker"] == elsewhere
    for _ in range(3):  # a new system prompt each time: no shared prefix, the session decides
        again = chat(stage, [system_prompt(), {"role": "user", "content": "Hi"}],
                     headers={"X-Agora-Session": session})  # fmt: skip
        assert again.headers["X-Agora-Worker"] == elsewhere
    by_user = chat(stage, [system_prompt()], user=session)  # OpenAI's `user` works the same
    assert by_user.headers["X-Agora-Worker"] == elsewhere


def test_a_hot_prefix_spreads_once_its_holder_is_full(stage: Stage) -> None:
    """Eight long requests at once for one prefix: the holder takes what its 4 slots allow
    (its cache bonus gone from 3 in flight), the rest go to other nodes, not into a queue."""
    hot = [system_prompt(), {"role": "user", "content": "Count to a hundred."}]
    holder = chat(stage, hot).headers["X-Agora-Worker"]
    start = threading.Barrier(8)

    def one(_i: int) -> httpx.Response:
        start.wait()  # all at once
        return chat(stage, hot, max_tokens=400, ignore_eos=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(one, range(8)))
    served = Counter(r.headers["X-Agora-Worker"] for r in responses)
    assert len(served) >= 2, served  # it did not all pile onto one node …
    assert served[holder] == max(served.values()), served  # … and the holder took the most
