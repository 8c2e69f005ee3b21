"""The ledger store on a real SQLite file and a real PostgreSQL database, migrated by Alembic."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func
from sqlmodel import Session, SQLModel, select

from billing.errors import InsufficientFunds
from billing.ledger import check_invariants, client_account, deposit, request_charge
from billing.pricing import Charge
from coordinator.store import ledger_store
from coordinator.store.db import make_engine, migrate, writers_turn
from coordinator.store.models import LedgerPosting, LedgerTransaction


def test_migrations_produce_exactly_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_migrate_is_idempotent(engine: Engine) -> None:
    migrate(engine)
    with Session(engine) as session:
        assert ledger_store.post(session, deposit("d1", "alice", 10))


def test_post_is_idempotent_per_transaction_id(engine: Engine) -> None:
    with Session(engine) as session:
        assert ledger_store.post(session, deposit("d1", "alice", 100))
        assert not ledger_store.post(session, deposit("d1", "alice", 100))
        assert ledger_store.balance(session, client_account("alice")) == 100


def test_overdraft_posts_nothing(engine: Engine) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "alice", 50))
        with pytest.raises(InsufficientFunds):
            ledger_store.post(session, request_charge("r1", "alice", "n1", Charge(90, 10)))
        assert session.get(LedgerTransaction, "req:r1") is None
        count = session.exec(select(func.count()).select_from(LedgerPosting)).one()
        assert count == 2  # the deposit's two postings only
        assert ledger_store.balance(session, client_account("alice")) == 50


def test_books_balance_after_a_charge(engine: Engine) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "alice", 1_000))
        ledger_store.post(session, request_charge("r1", "alice", "n1", Charge(90, 10)))
        balances = ledger_store.balances(session)
        assert balances[client_account("alice")] == 900
        assert sum(balances.values()) == 0
        assert check_invariants(balances, ledger_store.postings_by_transaction(session)) == []


def test_writers_of_a_shared_sqlite_file_take_turns(tmp_path: Path) -> None:
    """The ledger writers of `--processes N` queue in the kernel for the write lock: a second
    writer (here a thread with its own lock file handle, as another process has) waits while
    the first holds its turn and starts as soon as it is given back."""
    engine = make_engine(f"sqlite:///{tmp_path / 'shared.db'}")
    entered = threading.Event()

    def second_writer() -> None:
        with writers_turn(engine):
            entered.set()

    with writers_turn(engine):
        other = threading.Thread(target=second_writer)
        other.start()
        assert not entered.wait(0.3)  # waits its turn
    assert entered.wait(5)  # and gets it once the first is done
    other.join()
