"""Plain `pip install .` (no lock, no make) into a clean venv gives a working CLI: every module
the coordinator and the node's CLI import is a declared dependency, so an operator's image
(`pip install .`) or a provider's install (`pip install '.[worker]'` on a GPU host) cannot
crash on an import that only the lock file happened to provide."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pip_install_gives_a_working_coordinator_and_node_cli(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    agora = str(venv / "bin" / "agora")
    ready = tmp_path / "ready.json"
    coordinator = subprocess.Popen(
        [agora, "coordinator", "--http-port", "0", "--grpc-port", "0",
         "--data-dir", str(tmp_path / "coordinator"), "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert coordinator.poll() is None, coordinator.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the coordinator never became ready"
            time.sleep(0.2)
        base = json.loads(ready.read_text())["base_url"].removesuffix("/v1")
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
    finally:
        coordinator.terminate()
        coordinator.communicate(timeout=30)
    for command in (["worker", "--help"], ["worker", "init", "--help"], ["receipt", "--help"]):
        run = subprocess.run([agora, *command], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-2000:])
