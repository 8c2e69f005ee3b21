"""`agora bench holds`: what a request's credit hold costs at admission, side by side — holds
kept in the coordinator's memory (one coordinator per database; a balance read per admission)
vs holds in the database (replicas on one PostgreSQL; a transaction that locks the client's
account row, batched by the ledger writer) — on SQLite and on PostgreSQL, at several
concurrencies, with one client (every admission on one row lock) and with 64.

Each admission is what a request does: hold its worst case, then release it."""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine, make_url
from sqlmodel import Session

from billing.ledger import client_account, deposit
from coordinator.services.reservations import HoldBook, Reservations
from coordinator.services.shared_holds import SharedReservations
from coordinator.store import ledger_store
from coordinator.store.db import make_engine, migrate
from coordinator.store.writer import LedgerWriter

console = Console()
HOLD = 1_000  # micro-units per admission; balances cover every admission many times


@contextmanager
def _sqlite() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/bench.db"


@contextmanager
def _postgresql(admin_url: str) -> Iterator[str]:
    """A database made for this run and dropped after it."""
    name = f"agora_bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def _admit(
    book: HoldBook, clients: list[str], requests: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def lane() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            hold = await book.hold(clients[i % len(clients)], HOLD)
            latencies.append(time.perf_counter() - started)
            hold.release()

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    if isinstance(book, SharedReservations):
        await book.drain()  # a release is a write too: count it
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "admissions_per_s": requests / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


def _prepare(engine: Engine, clients: int) -> list[str]:
    migrate(engine)
    names = [f"bench-{i}" for i in range(clients)]
    with Session(engine) as session:
        for name in names:
            ledger_store.post(session, deposit(f"d-{name}", name, 10**15))
    return names


def _balance_reader(engine: Engine) -> Any:
    def read(client: str) -> int:
        with Session(engine) as session:
            return ledger_store.balance(session, client_account(client))

    return read


def _measure(url: str, client_counts: list[int], concurrencies: list[int], requests: int,
             progress: Progress, task: Any) -> list[dict[str, Any]]:  # fmt: skip
    engine = make_engine(url)
    writer = LedgerWriter(engine)
    rows = []
    try:
        everyone = _prepare(engine, max(client_counts))
        for n_clients in client_counts:
            clients = everyone[:n_clients]
            for concurrency in concurrencies:
                books: list[tuple[str, HoldBook]] = [
                    ("memory", Reservations(_balance_reader(engine))),
                    ("database", SharedReservations(writer)),
                ]
                for mode, book in books:
                    result = asyncio.run(_admit(book, clients, requests, concurrency))
                    rows.append({"holds": mode, "clients": n_clients,
                                 "concurrency": concurrency, **result})  # fmt: skip
                    progress.advance(task)
    finally:
        writer.close()
        engine.dispose()
    return rows


def holds(
    postgres_url: str = typer.Option(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="A PostgreSQL server (admin URL) to make a scratch database on; '' to skip.",
    ),
    requests: int = typer.Option(1_000, help="Admissions per measurement."),
    concurrency: str = typer.Option("1,32,128", help="Admissions in flight, comma-separated."),
    clients: str = typer.Option("1,64", help="Distinct clients, comma-separated."),
    out: Path = typer.Option(Path("bench/results/holds.json"), help="Results file (JSON)."),
) -> None:
    """Admission cost of credit holds: in memory vs in the database, SQLite vs PostgreSQL."""
    concurrencies = [int(c) for c in concurrency.split(",") if c.strip()]
    client_counts = [int(c) for c in clients.split(",") if c.strip()]
    backends = [("sqlite", _sqlite())] + ([("postgresql", _postgresql(postgres_url))]
                                          if postgres_url else [])  # fmt: skip
    rows: list[dict[str, Any]] = []
    with Progress(console=console) as progress:
        steps = len(backends) * len(client_counts) * len(concurrencies) * 2
        task = progress.add_task("admissions", total=steps)
        for backend, database in backends:
            with database as url:
                measured = _measure(url, client_counts, concurrencies, requests, progress, task)
                rows += [{"database": backend, **row} for row in measured]
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"Python {platform.python_version()}",
              "requests_per_measurement": requests, "rows": rows}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("db", "holds in", "clients", "in flight", "admissions/s", "p50 (ms)",
                  "p99 (ms)")  # fmt: skip
    for r in rows:
        table.add_row(r["database"], r["holds"], str(r["clients"]), str(r["concurrency"]),
                      f"{r['admissions_per_s']:,.0f}", f"{r['p50_ms']:.2f}",
                      f"{r['p99_ms']:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"written to {out}")
