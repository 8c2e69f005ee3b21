"""Database engine and migrations (Alembic, run at start-up)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Table, event
from sqlalchemy import Engine as Engine  # re-exported: services hand one to the store
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import create_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # let SQLAlchemy, not the sqlite3 module, decide where transactions begin: required for
    # SAVEPOINT to work (the ledger writer isolates each settlement in one)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it safe
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get(_BEGIN, '')}")


_BEGIN = "sqlite_begin"


def for_writes(engine: Engine) -> Engine:
    """The engine for a transaction that will write. On SQLite its BEGIN takes the write lock
    at once (IMMEDIATE): a deferred transaction that reads first and then writes fails at once
    with "database is locked", without waiting out the busy timeout, whenever another
    connection committed in between (WAL snapshots cannot be upgraded). Reads stay deferred
    so they never wait for the writer."""
    if engine.dialect.name != "sqlite":
        return engine
    return engine.execution_options(**{_BEGIN: "IMMEDIATE"})


@contextlib.contextmanager
def writers_turn(engine: Engine) -> Iterator[None]:
    """Wait in the kernel (flock on a file beside the database) for this process's turn to
    write a SQLite file several processes share (`--processes N`). SQLite's own busy handler
    polls with sleeps of up to 100 ms and no fairness: with two processes writing steadily
    the loser can wait seconds (p99 3.1 s at 32 streams); a flock waiter wakes as soon as the
    holder lets go. PostgreSQL and in-memory SQLite need no turn."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    fd = os.open(f"{path}-writers", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


@functools.cache
def _insert_ignoring(dialect: str, table: Table) -> Any:
    """The statement, built once per table (SQLAlchemy then reuses its compiled form)."""
    if dialect == "postgresql":
        return postgresql_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    raise RuntimeError(f"unsupported database {dialect}")  # pragma: no cover


def insert_ignoring_duplicates(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows, skipping any whose key is already there: a write retried, or raced by a
    second path to the same request, lands once."""
    conn.execute(_insert_ignoring(conn.dialect.name, table), rows)
