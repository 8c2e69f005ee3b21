"""One process whose children are a coordinator and a worker attached to an upstream: the
"gateway" the overhead benchmark measures, so CPU and memory of its process tree are exactly
Agora's full path (coordinator + worker).

    python -m agora.bench.gateway_host --workdir DIR --upstream http://127.0.0.1:18001/v1

Writes DIR/host.json ({"port", "key", "pid"}) once the coordinator serves; starts the worker as
soon as the upstream answers; stops both on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path

import httpx

from agora.stack import WorkerSpec, start_coordinator, start_worker

MODEL = "fake-model"  # the synthetic upstream's model


def _wait_for_upstream(url: str, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(0.2)
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--upstream", default="http://127.0.0.1:18001/v1")
    parser.add_argument("--max-concurrency", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=1, help="coordinator processes")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    workdir: Path = args.workdir
    quiet = ["--log-level", "WARNING"]  # as the peers ran (vllm-router: warning; LiteLLM: off)
    coordinator = start_coordinator(
        workdir,
        ["--http-port", "0", "--grpc-port", "0", "--processes", str(args.processes), *quiet],
    )
    key = coordinator.create_client("bench", 10**15)
    (workdir / "host.json").write_text(
        json.dumps({"port": int(coordinator.base_url.split(":")[-1].split("/")[0]), "key": key})
    )
    worker = None
    try:
        if _wait_for_upstream(args.upstream, stop):
            spec = WorkerSpec(
                "node", MODEL, engine_url=args.upstream, engine_model=MODEL, price_in=1,
                price_out=1, max_concurrency=args.max_concurrency, extra_args=quiet,
            )  # fmt: skip
            worker = start_worker(workdir, coordinator, spec)
        while not stop.is_set():
            if worker is not None and not worker.alive():
                raise SystemExit(f"worker exited:\n{worker.log_tail()}")
            stop.wait(0.5)
    finally:
        if worker is not None:
            worker.stop(timeout_s=10)
        coordinator.process.stop(timeout_s=10)
        time.sleep(0.1)


if __name__ == "__main__":
    main()
