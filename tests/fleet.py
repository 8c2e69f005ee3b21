"""Several real workers, each attached to the one real vLLM engine through its own fault proxy,
behind one real coordinator with short timeouts: the stage for gateway tests."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from protocol.identity import Identity
from tests.faults import FaultProxy

FAST = {
    "AGORA_COORDINATOR_IDLE_TOKEN_TIMEOUT_S": "3",  # a silent stream is a stalled worker
    "AGORA_COORDINATOR_FIRST_TOKEN_TIMEOUT_S": "30",
    "AGORA_COORDINATOR_QUEUE_TIMEOUT_S": "1",  # how long a request waits for a free slot
    "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
    "AGORA_COORDINATOR_BREAKER_COOLDOWN_S": "2",  # a failed worker sits out 2 s, 4 s, …
    # gateway tests count the jobs each engine sees: no spot checks here (tests/…/test_trust.py)
    "AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
    "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0",
}


@dataclass
class Member:
    spec: WorkerSpec
    proxy: FaultProxy
    process: Process
    node_id: str


@dataclass
class Fleet:
    coordinator: CoordinatorHandle
    workdir: Path
    engine_url: str
    members: dict[str, Member] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, engine_url: str, env: dict[str, str] | None = None) -> Fleet:
        return cls(start_coordinator(workdir, env={**FAST, **(env or {})}), workdir, engine_url)

    def add(
        self, name: str, model: str, price_in: int, price_out: int, max_concurrency: int = 8,
        extra_args: tuple[str, ...] = (),
    ) -> Member:  # fmt: skip
        proxy = FaultProxy(self.engine_url).start()
        spec = WorkerSpec(
            name, model, engine_url=proxy.base_url, engine_model="tiny", price_in=price_in,
            price_out=price_out, max_concurrency=max_concurrency, extra_args=list(extra_args),
        )  # fmt: skip
        member = Member(spec, proxy, self._launch(spec), "")
        key = self.workdir / f"{name}.key"
        deadline = time.monotonic() + 30
        while not key.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        member.node_id = Identity.load(key).node_id
        self.members[name] = member
        return member

    def _launch(self, spec: WorkerSpec) -> Process:
        return start_worker(self.workdir, self.coordinator, spec)

    def wait(self, model: str, count: int) -> None:
        _name, key = self.client(1)
        procs = [m.process for m in self.members.values() if m.spec.served_model == model]
        wait_for_workers(self.coordinator, key, model, count, procs, timeout_s=60)

    def ready(self, model: str, count: int, timeout_s: float = 60.0) -> None:
        """Wait until `count` workers serve `model` with a free slot and no breaker cooldown
        (after a kill, the next request needs two: one to serve and one to continue)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.coordinator.admin() as admin:
                workers = admin.get("/workers").json()["workers"]
            fit = [
                w for w in workers
                if (m := w["models"].get(model)) and m["available"] and not m["cooldown_left_s"]
                and m["in_flight"] < m["max_concurrency"]
            ]  # fmt: skip
            if len(fit) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(fit)} of {count} `{model}` workers ready: {workers}")
            time.sleep(0.1)

    def name_of(self, node_id: str) -> str:
        return next(n for n, m in self.members.items() if m.node_id == node_id)

    def kill(self, name: str) -> None:
        process = self.members[name].process
        process.popen.kill()
        process.popen.wait()

    def restart(self, name: str) -> None:
        member = self.members[name]
        member.process = self._launch(member.spec)

    def client(self, credit: int = 10**12, **limits: int) -> tuple[str, str]:
        name = f"c-{uuid.uuid4().hex[:8]}"
        with self.coordinator.admin() as admin:
            response = admin.post("/clients", json={"name": name, "credit": credit, **limits})
            response.raise_for_status()
            return name, str(response.json()["api_key"])

    def worker_view(self, node_id: str) -> dict[str, Any] | None:
        with self.coordinator.admin() as admin:
            for worker in admin.get("/workers").json()["workers"]:
                if worker["node_id"] == node_id:
                    return dict(worker)
        return None

    def stop(self) -> None:
        for member in self.members.values():
            member.process.stop()
            member.proxy.stop()
        self.coordinator.process.stop()
