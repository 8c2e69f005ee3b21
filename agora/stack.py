"""Start and stop a local market (coordinator + workers) as real processes.

Used by `agora demo` and by the test suite, so both run exactly what a user would run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


class StackError(Exception):
    pass


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait for a clean exit, then SIGKILL the whole process group."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        return self.popen.returncode


def spawn_agora(
    name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> Process:
    """Run `agora ARGS…` in its own process group, output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "agora", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return Process(name, popen, log_path)


@dataclass
class CoordinatorHandle:
    process: Process
    info: dict[str, Any]
    admin_token: str

    @property
    def base_url(self) -> str:
        return str(self.info["base_url"])

    @property
    def grpc_target(self) -> str:
        return str(self.info["grpc_target"])

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url.removesuffix("/v1") + "/admin/v1",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )

    def create_client(self, name: str, credit: int) -> str:
        with self.admin() as admin:
            response = admin.post("/clients", json={"name": name, "credit": credit})
            response.raise_for_status()
            return str(response.json()["api_key"])

    def balances(self) -> dict[str, int]:
        with self.admin() as admin:
            response = admin.get("/balances")
            response.raise_for_status()
            return {k: int(v) for k, v in response.json()["accounts"].items()}


def start_coordinator(
    workdir: Path,
    extra_args: list[str] | None = None,
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> CoordinatorHandle:
    data = workdir / "coordinator"
    data.mkdir(parents=True, exist_ok=True)
    ready = data / "ready.json"
    ready.unlink(missing_ok=True)
    args = [
        "coordinator",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--data-dir",
        str(data),
        "--ready-file",
        str(ready),
        *(extra_args or []),
    ]
    process = spawn_agora("coordinator", args, workdir / "coordinator.log", env)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if not process.alive():
            raise StackError(f"coordinator exited:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            process.stop()
            raise StackError(f"coordinator not ready in {timeout_s:.0f} s:\n{process.log_tail()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    token = Path(info["admin_token_file"]).read_text().strip()
    return CoordinatorHandle(process, info, token)


@dataclass
class WorkerSpec:
    name: str
    served_model: str
    model: str | None = None  # spawn vLLM on this folder ...
    engine_url: str | None = None  # ... or attach
    engine_model: str | None = None  # the attached server's own name for the model
    price_in: int = 100_000
    price_out: int = 200_000
    max_concurrency: int = 8
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the process


TINY_ENGINE_ARGS = ["--max-model-len", "512", "--dtype", "bfloat16", "--enforce-eager"]


def start_worker(workdir: Path, coordinator: CoordinatorHandle, spec: WorkerSpec) -> Process:
    args = [
        "worker",
        "--coordinator",
        coordinator.grpc_target,
        "--served-model-name",
        spec.served_model,
        "--price-in",
        str(spec.price_in),
        "--price-out",
        str(spec.price_out),
        "--max-concurrency",
        str(spec.max_concurrency),
        "--key",
        str(workdir / f"{spec.name}.key"),
        "--state-dir",
        str(workdir / f"{spec.name}-state"),
        *spec.extra_args,
    ]
    if spec.model:
        args += ["--model", spec.model]
    if spec.engine_url:
        args += ["--engine-url", spec.engine_url]
    if spec.engine_model:
        args += ["--engine-model", spec.engine_model]
    return spawn_agora(spec.name, args, workdir / f"{spec.name}.log", spec.env or None)


def wait_for_workers(
    coordinator: CoordinatorHandle,
    api_key: str,
    model: str,
    count: int,
    workers: list[Process],
    timeout_s: float = 600.0,
    on_wait: Callable[[float], None] | None = None,
) -> None:
    """Block until /v1/models lists `model` served by `count` workers."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=coordinator.base_url, headers=headers, timeout=10) as client:
        while True:
            for proc in workers:
                if not proc.alive():
                    raise StackError(f"{proc.name} exited:\n{proc.log_tail()}")
            listed = {m["id"]: m for m in client.get("/models").json()["data"]}
            if listed.get(model, {}).get("workers", 0) >= count:
                return
            elapsed = time.monotonic() - started
            if elapsed > timeout_s:
                raise StackError(f"workers not registered after {timeout_s:.0f} s")
            if on_wait:
                on_wait(elapsed)
            time.sleep(0.5)
