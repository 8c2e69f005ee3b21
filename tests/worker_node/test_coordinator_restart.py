"""The coordinator goes away and comes back: workers find it again by themselves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agora.stack import WorkerSpec, start_coordinator, start_worker, wait_for_workers
from tests.conftest import SdkFactory
from worker_node.engines.vllm import VllmEngine, free_port

pytestmark = pytest.mark.engine


def test_worker_reconnects_after_a_coordinator_restart(
    vllm_engine: VllmEngine, tmp_path: Path, sdk: SdkFactory
) -> None:
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    coordinator = start_coordinator(tmp_path, ports)
    worker = start_worker(
        tmp_path,
        coordinator,
        WorkerSpec(name="rw", served_model="tiny", engine_url=vllm_engine.base_url),
    )
    try:
        key = coordinator.create_client("restart", 10_000_000)
        wait_for_workers(coordinator, key, "tiny", 1, [worker], timeout_s=60)

        coordinator.process.popen.kill()  # no goodbye: as if the machine died
        coordinator.process.popen.wait()
        time.sleep(2.0)  # the worker notices and starts backing off
        coordinator = start_coordinator(tmp_path, ports)  # same ports, same data dir
        back = time.monotonic()
        wait_for_workers(coordinator, key, "tiny", 1, [worker], timeout_s=30)
        rejoined_s = time.monotonic() - back

        client = sdk(coordinator.base_url, key)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=3
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        # the API key and credit survived: they live in the coordinator's database
        assert coordinator.balances()["client:restart"] < 10_000_000
        assert rejoined_s < 30  # `agora bench resilience` measures it precisely
        assert worker.alive()
    finally:
        worker.stop()
        coordinator.process.stop()
