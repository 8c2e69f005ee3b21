"""`agora ledger check` on real books: clean after real traffic (failovers and mid-stream
continuations included), and loud when the stored books are tampered with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import Session

from billing.ledger import deposit
from coordinator.store import ledger_store
from coordinator.store.db import make_engine, migrate
from coordinator.store.tables import ACCOUNTS
from tests.fleet import Fleet


def ledger_check(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agora", "ledger", "check", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.engine
def test_books_are_sound_after_the_gateway_traffic(fleet: Fleet) -> None:
    _name, key = fleet.client()
    served = httpx.post(  # at least one settled request, whatever ran before
        f"{fleet.coordinator.base_url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    )  # fmt: skip
    assert served.status_code == 200
    providers = [a for a in fleet.coordinator.balances() if a.startswith("provider:")]
    assert providers
    result = ledger_check(fleet.workdir / "coordinator")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger is sound" in result.stdout


def test_a_tampered_balance_is_reported(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    migrate(engine)
    with Session(engine) as session:
        assert ledger_store.post(session, deposit("d1", "alice", 100))
    assert ledger_check(tmp_path).returncode == 0
    with engine.begin() as conn:
        conn.execute(update(ACCOUNTS).where(ACCOUNTS.c.name == "client:alice").values(balance=150))
    result = ledger_check(tmp_path)
    assert result.returncode == 1
    assert "client:alice: stored balance 150 != sum of postings 100" in result.stdout
