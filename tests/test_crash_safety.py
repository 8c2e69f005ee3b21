"""Crash safety of settlement: a coordinator killed after a request was answered and its
receipts committed, before its ledger posting, posts it at the next start, exactly once (SQLite
and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from agora.cli import app as agora_app
from agora.stack import WorkerSpec, start_coordinator, start_worker, wait_for_workers
from billing.ledger import client_account
from billing.pricing import Price, charge_for
from coordinator.services.audit import audit_ledger
from coordinator.store.db import make_engine
from tests.conftest import MODEL
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
CRASH = {"AGORA_COORDINATOR_FAULT_EXIT_BEFORE_POSTING": "1"}


def counts(database_url: str) -> tuple[int, int, int]:
    """(stored receipts, staged settlements, posted request transactions)"""
    engine = make_engine(database_url)
    with engine.connect() as conn:
        receipts, staged, posted = (
            int(conn.execute(text(query)).scalar() or 0)
            for query in (
                "SELECT count(*) FROM storedreceipt",
                "SELECT count(*) FROM pendingposting",
                "SELECT count(*) FROM ledgertransaction WHERE kind = 'request'",
            )
        )
    engine.dispose()
    return receipts, staged, posted


def test_a_coordinator_killed_between_receipts_and_posting_posts_once_at_restart(
    vllm_engine: VllmEngine, database_url: str, tmp_path: Path
) -> None:
    env = {"AGORA_COORDINATOR_DATABASE_URL": database_url}
    coordinator = start_coordinator(tmp_path, env={**env, **CRASH})
    spec = WorkerSpec("w", MODEL, engine_url=vllm_engine.base_url)
    worker = start_worker(tmp_path, coordinator, spec)
    try:
        key = coordinator.create_client("ann", 10**9)
        wait_for_workers(coordinator, key, MODEL, 1, [worker], timeout_s=120)
        before = coordinator.balances()[client_account("ann")]
        with openai.OpenAI(base_url=coordinator.base_url, api_key=key, max_retries=0) as client:
            # answered once its receipt is checked; the coordinator dies posting it, after
            reply = client.completions.create(
                model=MODEL, prompt="Hello", max_tokens=8, temperature=0
            )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 8
        assert coordinator.process.popen.wait(timeout=60) == 70
    finally:
        worker.stop()
        coordinator.process.stop()
    assert counts(database_url) == (1, 1, 0)  # the receipt is safe; the posting is not made

    for _restart in range(2):  # the first start posts it; the second finds nothing to do
        again = start_coordinator(tmp_path, env=env)
        try:
            assert counts(database_url) == (1, 0, 1)
            paid = before - again.balances()[client_account("ann")]
        finally:
            again.process.stop()
        engine = make_engine(database_url)
        with engine.connect() as conn:
            prompt, completion = conn.execute(
                text("SELECT billed_prompt_tokens, billed_completion_tokens FROM storedreceipt")
            ).one()
        assert completion == 8
        price = Price(spec.price_in, spec.price_out)
        assert paid == charge_for(price, prompt, completion, 500).total
        assert audit_ledger(engine) == []
        engine.dispose()
    checked = CliRunner().invoke(agora_app, ["ledger", "check", "--database-url", database_url])
    assert checked.exit_code == 0, checked.output
