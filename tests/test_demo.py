"""`agora demo` as a user runs it: its own coordinator, workers and vLLM engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def engine_pids() -> set[int]:
    """PIDs of every vLLM engine process spawned through the worker node."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"worker_node.engines.vllm_entry" in cmdline or b"VllmWorker" in cmdline:
            pids.add(int(entry.name))
    return pids


def wait_gone(pids: set[int], timeout_s: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = pids & engine_pids()
        if not alive:
            return set()
        time.sleep(0.5)
    return pids & engine_pids()


def test_demo_prints_answer_usage_verified_receipt_and_balances() -> None:
    before = engine_pids()
    result = subprocess.run(
        [sys.executable, "-m", "agora", "demo"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "usage: prompt_tokens=" in out
    assert "receipt: verified (worker 12D3KooW" in out
    assert "receipt: token counts match the usage" in out
    assert "ledger: balances sum to 0 (balanced)" in out
    assert "client:demo" in out
    assert "stopped    every process the demo started" in result.stderr
    assert wait_gone(engine_pids() - before) == set()


def test_demo_serve_runs_a_market_for_any_openai_client_until_sigterm() -> None:
    before = engine_pids()
    with subprocess.Popen(
        [sys.executable, "-m", "agora", "demo", "--serve", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        code = _drive_served_demo(proc, before)
    assert code == 0
    assert wait_gone(engine_pids() - before) == set()


def _drive_served_demo(proc: subprocess.Popen[str], before: set[int]) -> int:
    try:
        assert proc.stdout is not None
        env: dict[str, str] = {}
        deadline = time.monotonic() + 900
        while len(env) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("AGORA_"):
                key, _, value = line.strip().partition("=")
                env[key] = value
        assert set(env) == {"AGORA_BASE_URL", "AGORA_API_KEY"}, f"demo exited {proc.poll()}"
        assert env["AGORA_BASE_URL"].endswith("/v1")
        spawned = engine_pids() - before
        assert len(spawned) >= 3  # one engine per worker and the embedder's (plus children)

        with openai.OpenAI(base_url=env["AGORA_BASE_URL"], api_key=env["AGORA_API_KEY"]) as client:
            models = {m.id: m for m in client.models.list()}
            assert (models["tiny"].model_extra or {})["workers"] == 2
            reply = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5
            )
            vectors = client.embeddings.create(model="tiny-embed", input=["hello", "world"])
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 5
        assert (models["tiny-embed"].model_extra or {})["task"] == "embed"
        assert [len(v.embedding) for v in vectors.data] == [256, 256]  # the tiny Llama's width
        assert vectors.usage.prompt_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=180)
