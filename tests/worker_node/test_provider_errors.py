"""What a provider sees when something is wrong: one line that says what to do."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agora.stack import spawn_agora
from worker_node.engines.vllm import VllmEngine, free_port


def _worker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agora", "worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_model_folder(tmp_path: Path) -> None:
    result = _worker(
        "--coordinator", "127.0.0.1:1", "--model", str(tmp_path / "no-such-model"),
        "--key", str(tmp_path / "k"), "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: model folder" in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_config_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[node]\ncoordinator = "x:1"\n[[models]]\nname = "m"\nprice_in = -5\n')
    result = _worker("start", "--config", str(config))
    assert result.returncode == 1
    assert "models.0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.engine
@pytest.mark.slow
def test_engine_that_cannot_start_shows_its_last_log_lines(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    result = _worker(
        "--coordinator", "127.0.0.1:1", "--model", str(broken), "--enforce-eager",
        "--key", str(tmp_path / "k"), "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert result.returncode == 1
    first = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "vLLM exited with code" in first
    assert "last lines of" in result.stderr
    assert "no-such-architecture" in result.stderr  # the engine's own explanation


@pytest.mark.engine
def test_unreachable_coordinator_is_a_retried_warning_not_a_traceback(
    vllm_engine: VllmEngine, tmp_path: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    worker = spawn_agora(
        "lonely",
        ["worker", "--coordinator", closed, "--engine-url", vllm_engine.base_url,
         "--served-model-name", "tiny", "--key", str(tmp_path / "k"),
         "--state-dir", str(tmp_path / "s")],
        tmp_path / "lonely.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "unreachable" not in worker.log_tail(50) and time.monotonic() < deadline:
            time.sleep(0.3)
        log = worker.log_tail(50)
        assert f"coordinator {closed}: unreachable (is it running" in log
        assert "reconnecting" in log
        assert "Traceback" not in log
        assert worker.alive()  # keeps trying
    finally:
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(timeout=30) == 0
