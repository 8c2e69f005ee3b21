"""Multi-LoRA across providers, on the real vLLM engine: adapters registered once at the
coordinator by hash, fetched by nodes over their session, verified, loaded on demand, routed
to the node that holds them, named in the signed receipt, and refused when tampered with.

Both nodes attach to one LoRA-enabled engine (one start-up, not two); each loads adapters
under its own names, so neither sees the other's (worker_node.adapters)."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agora.cli import app as cli
from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from protocol.adapter import folder_digest, pack
from protocol.receipt import SignedReceipt, verify_receipt
from tests.conftest import MODEL
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.tiny_lora import build_lora

pytestmark = pytest.mark.engine
PROMPT = [{"role": "user", "content": "Name three colours."}]
ADAPTER_PRICE_OUT = 350_000  # node A's price with an adapter; node B inherits its base price


@dataclass
class Stage:
    coordinator: CoordinatorHandle
    workers: dict[str, Process]
    node_ids: dict[str, str]  # worker name -> node id
    adapters: dict[str, Path]  # adapter name -> folder
    workdir: Path
    key: str


@pytest.fixture(scope="module")
def lora_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One LoRA-enabled vLLM engine with run-time adapter loading; its base URL."""
    log = tmp_path_factory.mktemp("lora-engine") / "engine.log"
    engine = VllmEngine(
        VllmConfig(
            model=str(tiny_model), served_model=MODEL, max_model_len=512, dtype="float32",
            enforce_eager=True, log_path=log, startup_timeout_s=600,
            extra_args=("--enable-lora", "--max-lora-rank", "8", "--max-loras", "4",
                        "--max-cpu-loras", "4"),
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        )
    )  # fmt: skip
    asyncio.run(engine.start())
    try:
        yield engine.base_url
    finally:
        asyncio.run(engine.stop())


def make_stage(
    workdir: Path, tiny_model: Path, engine_url: str, nodes: dict[str, list[str]],
    spot_checks: bool = False,
) -> Stage:  # fmt: skip
    rate = "1" if spot_checks else "0"
    coordinator = start_coordinator(workdir, env={
        "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(tiny_model)}),
        "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
        "AGORA_COORDINATOR_SPOT_CHECK_RATE": rate,
        "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": rate,
    })  # fmt: skip
    workers: dict[str, Process] = {}
    try:
        for name, extra in nodes.items():
            workers[name] = start_worker(workdir, coordinator, WorkerSpec(
                name=name, served_model=MODEL, engine_url=engine_url, engine_model=MODEL,
                extra_args=extra,
            ))  # fmt: skip
        key = coordinator.create_client("lora-client", 10**12)
        wait_for_workers(coordinator, key, MODEL, len(nodes), list(workers.values()), 120)
        folders = {
            f"l{seed}": build_lora(tiny_model, workdir / f"adapter-l{seed}", seed=seed)
            for seed in (1, 2, 3)
        }
        node_ids = {name: _node_id(workdir, name) for name in workers}
        return Stage(coordinator, workers, node_ids, folders, workdir, key)
    except BaseException:
        stop(workers, coordinator)
        raise


def stop(workers: dict[str, Process], coordinator: CoordinatorHandle) -> None:
    for w in workers.values():
        w.stop()
    coordinator.process.stop()


@pytest.fixture(scope="module")
def stage(
    tiny_model: Path, lora_engine: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stage]:
    """Two nodes with one adapter slot each: A charges more for adapter jobs, B inherits."""
    nodes = {
        "lora-a": ["--max-loras", "1", "--adapter-price-out", str(ADAPTER_PRICE_OUT)],
        "lora-b": ["--max-loras", "1"],
    }
    built = make_stage(tmp_path_factory.mktemp("lora"), tiny_model, lora_engine, nodes)
    yield built
    stop(built.workers, built.coordinator)


def _node_id(workdir: Path, name: str) -> str:
    status = json.loads((workdir / f"{name}-state" / "status.json").read_text())
    return str(status["node_id"])


def register(stage: Stage, adapter: str) -> str:
    """`agora models add-adapter` and a catalogue model `tiny-<adapter>` that runs it."""
    data_dir = stage.workdir / "coordinator"
    common = ["--url", stage.coordinator.base_url.removesuffix("/v1"), "--data-dir",
              str(data_dir)]  # fmt: skip
    result = CliRunner().invoke(cli, ["models", "add-adapter", str(stage.adapters[adapter]),
                                      "--name", adapter, "--base", MODEL, *common])  # fmt: skip
    assert result.exit_code == 0, result.output
    sha = result.output.split()[0]
    assert sha == folder_digest(stage.adapters[adapter])
    name = f"tiny-{adapter}-{uuid.uuid4().hex[:4]}"
    result = CliRunner().invoke(cli, ["models", "create", name, f"v1={MODEL}+{sha}", *common])
    assert result.exit_code == 0, result.output
    return name


def chat(
    stage: Stage, model: str, order: list[str] | None = None, fallbacks: bool = True,
    max_tokens: int = 12,
) -> httpx.Response:  # fmt: skip
    body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": max_tokens,
                            "temperature": 0}  # fmt: skip
    if order:
        body["provider"] = {"order": order, "allow_fallbacks": fallbacks}
    return httpx.post(f"{stage.coordinator.base_url}/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {stage.key}"})  # fmt: skip


def client_get(stage: Stage, path: str) -> dict[str, Any]:
    response = httpx.get(f"{stage.coordinator.base_url}/{path}", timeout=30,
                         headers={"Authorization": f"Bearer {stage.key}"})  # fmt: skip
    assert response.status_code == 200, response.text
    return dict(response.json())


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def held(stage: Stage, node_id: str, want: list[str], timeout_s: float = 10.0) -> list[str]:
    """The adapters the coordinator sees loaded on a node (from its heartbeats), once they
    are `want` or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        with stage.coordinator.admin() as admin:
            workers = admin.get("/workers").json()["workers"]
        found = next(w["models"][MODEL]["adapters"] for w in workers if w["node_id"] == node_id)
        if found == want or time.monotonic() > deadline:
            return list(found)
        time.sleep(0.2)


def test_two_adapters_on_two_nodes_route_to_the_holder_differ_from_the_base_and_are_receipted(
    stage: Stage,
) -> None:
    a, b = stage.node_ids["lora-a"], stage.node_ids["lora-b"]
    m1, m2 = register(stage, "l1"), register(stage, "l2")
    sha1, sha2 = folder_digest(stage.adapters["l1"]), folder_digest(stage.adapters["l2"])
    # first use, pinned: node A fetches and loads l1, node B l2 (each a cold load)
    first1, first2 = chat(stage, m1, [a], False), chat(stage, m2, [b], False)
    assert first1.headers["X-Agora-Worker"] == a
    assert first2.headers["X-Agora-Worker"] == b
    assert held(stage, a, [sha1]) == [sha1]
    assert held(stage, b, [sha2]) == [sha2]
    # from now on every request lands where its adapter is loaded, with no cold-load cost
    for _ in range(4):
        for model, holder in ((m1, a), (m2, b)):
            response = chat(stage, model)
            assert response.headers["X-Agora-Worker"] == holder, response.headers
            assert response.json()["model"] == f"{model}@v1"
            chosen = response.headers["X-Agora-Route"].split("ranked=")[1].split(";")[0]
            assert chosen.endswith("cold=0)"), chosen  # the cold-load term, in the header
    # the adapters change the output: each differs from the base model and from the other
    base = text(chat(stage, MODEL))
    one, two = text(first1), text(first2)
    assert len({base, one, two}) == 3, (base, one, two)
    assert text(chat(stage, m1)) == one  # greedy: the same adapter answers the same
    # the signed receipt names the adapter; A's adapter price, B's inherited base price
    for response, sha, price_out in ((first1, sha1, ADAPTER_PRICE_OUT), (first2, sha2, 200_000)):
        document = client_get(stage, f"receipts/{response.json()['id']}")
        receipt = verify_receipt(SignedReceipt.from_json(document))
        assert receipt.adapter_sha256 == sha
        assert receipt.price_completion_per_mtok == price_out


def test_a_tampered_adapter_is_refused_by_the_node_and_the_request_served_elsewhere(
    stage: Stage,
) -> None:
    a, b = stage.node_ids["lora-a"], stage.node_ids["lora-b"]
    m3 = register(stage, "l3")
    sha3 = folder_digest(stage.adapters["l3"])
    assert text(chat(stage, m3, [a], False))  # A fetches l3 and keeps a copy on disk
    other = register(stage, "l1")  # l1 again (same hash: registered once) under a new name
    assert text(chat(stage, other, [a], False))  # A has one slot: l3 is unloaded for l1
    sha1 = folder_digest(stage.adapters["l1"])
    assert held(stage, a, [sha1]) == [sha1]
    copy = stage.workdir / "lora-a-state" / "adapters" / sha3
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of the weights, on the node's own disk
    weights.write_bytes(bytes(data))
    response = chat(stage, m3, [a])  # A first; fallbacks allowed
    assert response.status_code == 200, response.text
    assert response.headers["X-Agora-Worker"] == b  # served by B, which fetched a clean copy
    route = client_get(stage, f"routing/{response.json()['id']}")
    refused = route["attempts"][0]
    assert refused["worker"] == a, route
    assert "does not match its hash" in refused["outcome"], route
    assert not copy.exists()  # the node deleted what it refused
    # A fetches a clean copy next time and serves it
    again = chat(stage, m3, [a], False)
    assert again.headers["X-Agora-Worker"] == a
    assert text(again) == text(response)


def test_the_coordinator_refuses_what_is_not_an_adapter_or_not_registered(
    stage: Stage, tiny_model: Path
) -> None:
    with stage.coordinator.admin() as admin:
        assert admin.post("/adapters", content=b"not a tar", params={
            "name": "junk", "base_model": MODEL}).status_code == 400  # fmt: skip
        unknown = "0" * 64
        response = admin.post("/models", json={"name": f"x-{uuid.uuid4().hex[:4]}", "versions": [
            {"version": "v1", "serves": MODEL, "adapter_sha256": unknown}]})  # fmt: skip
        assert response.status_code == 400
        assert "not registered" in response.json()["error"]["message"]
        # an adapter registered for another base model: a version of `tiny` may not run it
        folder = build_lora(tiny_model, stage.workdir / f"other-{uuid.uuid4().hex[:6]}",
                            seed=int(uuid.uuid4().int % 10**6) + 100)  # fmt: skip
        other = admin.post("/adapters", content=pack(folder), params={
            "name": "other", "base_model": "other-model"})  # fmt: skip
        assert other.status_code == 201
        sha = other.json()["sha256"]
        assert sha == folder_digest(folder)
        version = {"version": "v1", "serves": MODEL, "adapter_sha256": sha}
        response = admin.post("/models", json={"name": f"x-{uuid.uuid4().hex[:4]}",
                                               "versions": [version]})  # fmt: skip
        assert response.status_code == 400
        assert "other-model" in response.json()["error"]["message"]
        again = admin.post("/adapters", content=pack(folder), params={
            "name": "other", "base_model": "other-model"})  # fmt: skip
        assert again.status_code == 200  # the same bytes: registered once
        listed = admin.get("/adapters").json()["adapters"]
        assert sha in {c["sha256"] for c in listed}


def test_an_archive_in_another_tar_form_is_registered_by_its_canonical_hash(
    stage: Stage,
) -> None:
    """Workers check a folder's canonical hash: an upload made by plain `tar` (other times,
    owners, order) is stored in canonical form, under the hash a worker will find."""
    folder = stage.adapters["l1"]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(p.name for p in folder.iterdir())[::-1]:  # another order
            info = tar.gettarinfo(str(folder / name), arcname=name)
            info.mtime, info.uname = 12345, "someone"
            with (folder / name).open("rb") as f:
                tar.addfile(info, f)
    with stage.coordinator.admin() as admin:
        card = admin.post("/adapters", content=raw.getvalue(), params={
            "name": "l1-by-tar", "base_model": MODEL}).json()  # fmt: skip
    assert card["sha256"] == folder_digest(folder)


def test_a_spot_check_of_an_adapter_job_runs_on_another_node_with_the_same_adapter(
    tiny_model: Path, lora_engine: str, tmp_path: Path
) -> None:
    """Every job is checked here: the adapter's greedy tokens are genuine only when the
    reference scores them with the same adapter (the base model would call them made up)."""
    nodes = {"reference": ["--max-loras", "1"], "checked": ["--max-loras", "1"]}
    checked = make_stage(tmp_path, tiny_model, lora_engine, nodes, spot_checks=True)
    try:
        ref, node = checked.node_ids["reference"], checked.node_ids["checked"]
        for _ in range(4):  # the reference earns more trust than the node it will check
            assert chat(checked, MODEL, [ref], False).status_code == 200
        model = register(checked, "l1")
        response = chat(checked, model, [node], False, max_tokens=24)
        assert response.headers["X-Agora-Worker"] == node
        request_id = response.json()["id"].rsplit("-", 1)[-1]
        deadline, events = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            with checked.coordinator.admin() as admin:
                trace = admin.get("/trust/events", params={"node_id": node}).json()
            events = [e for e in trace["events"] if e["request_id"] == request_id]
            if any(e["outcome"] in ("verified", "fraud") for e in events):
                break
            time.sleep(0.5)
        outcomes = [e["outcome"] for e in events]
        assert "verified" in outcomes, trace
        assert "fraud" not in outcomes
        sha = folder_digest(checked.adapters["l1"])
        assert held(checked, ref, [sha]) == [sha]  # the reference loaded l1 to check it
    finally:
        stop(checked.workers, checked.coordinator)
