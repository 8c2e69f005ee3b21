"""`agora coordinator --processes 2` with a real node on real vLLM: both processes answer on the
one HTTP port and route to the node (which holds a session with each), the books stay one,
/metrics sums both, and a process that dies is started again and gets the node back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from agora.stack import WorkerSpec, start_coordinator, start_worker
from coordinator.config import CoordinatorSettings
from tests.conftest import MODEL, books_problems
from worker_node.engines.vllm import VllmEngine

Seen = dict[int, int]  # process index -> workers it has


def until_health(root: str, done: Callable[[Seen], bool], timeout_s: float) -> Seen:
    """Ask /health on fresh connections (the kernel spreads them over the processes) until
    `done` holds for what the processes answered."""
    seen: Seen = {}
    deadline = time.monotonic() + timeout_s
    while not done(seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes answered {seen} within {timeout_s} s")
        try:
            body = httpx.get(f"{root}/health", timeout=5).json()
        except httpx.TransportError:
            continue  # a process went away while this connection was queued at it
        seen[body["process"]] = body["workers"]
        time.sleep(0.02)
    return seen


def until_exited(pid: int, timeout_s: float = 10) -> None:
    """Until the process has exited (a zombie or gone): only then is its listening socket closed
    and out of the port's group, so the kernel stops handing it new connections. A connection
    it was handed before that is reset by the kernel, which no process can serve."""
    deadline = time.monotonic() + timeout_s
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"process {pid} still {state} after SIGKILL"
        time.sleep(0.01)


def both_have_the_node(seen: Seen) -> bool:
    return seen.keys() == {0, 1} and all(workers == 1 for workers in seen.values())


def ask(base_url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def requests_ok(root: str) -> float:
    metrics = httpx.get(f"{root}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("agora_requests_total{") and 'status="ok"' in line
    )


@pytest.mark.engine
def test_two_processes_share_the_port_the_books_and_the_node(
    vllm_engine: VllmEngine, tmp_path: Path
) -> None:
    coordinator = start_coordinator(tmp_path, ["--processes", "2"])
    worker = start_worker(
        tmp_path, coordinator, WorkerSpec("worker-a", MODEL, engine_url=vllm_engine.base_url)
    )
    root = coordinator.base_url.removesuffix("/v1")
    try:
        processes = coordinator.info["processes"]
        assert [p["index"] for p in processes] == [0, 1]
        assert len({p["pid"] for p in processes} | {coordinator.info["pid"]}) == 3
        until_health(root, both_have_the_node, timeout_s=60)

        key = coordinator.create_client("client", 100_000_000)
        for _ in range(12):  # each on a new connection, so both processes serve some
            response = ask(coordinator.base_url, key)
            assert response.status_code == 200, response.text
        assert requests_ok(root) == 12  # whichever process answers, it counts both

        os.kill(processes[1]["pid"], signal.SIGKILL)
        until_exited(processes[1]["pid"])
        # until the killed process is back with the node, and through its restart, every
        # request is served: the other process has the node, and the new one takes clients
        # only once the node has rejoined it
        asked, seen = 0, Seen()
        deadline = time.monotonic() + 90
        while asked < 6 or not both_have_the_node(seen):
            assert time.monotonic() < deadline, f"process 1 not back with the node: {seen}"
            response = ask(coordinator.base_url, key)
            assert response.status_code == 200, response.text
            asked += 1
            body = httpx.get(f"{root}/health", timeout=5).json()
            seen[body["process"]] = body["workers"]
        assert requests_ok(root) == 12 + asked  # the dead process's counts are kept
        assert coordinator.balances()["client:client"] < 100_000_000  # charged, in the one ledger
    finally:
        worker.stop()
        coordinator.process.stop()
    assert books_problems(tmp_path) == []  # one ledger, every posting balanced


def test_several_processes_keep_credit_holds_in_the_shared_database(tmp_path: Path) -> None:
    """In-memory holds would let each process admit up to the client's whole balance."""
    assert CoordinatorSettings(data_dir=tmp_path, processes=2).holds_in_database
    assert not CoordinatorSettings(data_dir=tmp_path).holds_in_database  # SQLite, one process
    with pytest.raises(ValueError, match="credit holds"):
        CoordinatorSettings(data_dir=tmp_path, processes=2, shared_holds=False)
    with pytest.raises(ValueError, match="p2p market"):
        CoordinatorSettings(data_dir=tmp_path, processes=2, p2p_listen="/ip4/127.0.0.1/tcp/0")
