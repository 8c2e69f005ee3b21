"""`agora coordinator …`: run the market's gateway, and manage its clients."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from billing.pricing import format_micro
from coordinator.app import Coordinator
from coordinator.config import CoordinatorSettings

app = typer.Typer(help="Run the coordinator (OpenAI API for clients, gRPC for workers).")
console = Console()


def _settings(ctx: typer.Context) -> CoordinatorSettings:
    settings: CoordinatorSettings = ctx.obj
    return settings


@app.callback(invoke_without_command=True)
def coordinator(
    ctx: typer.Context,
    host: str | None = typer.Option(None, help="Interface to bind (default 127.0.0.1)."),
    http_port: int | None = typer.Option(None, help="OpenAI API port (0 = any free)."),
    grpc_port: int | None = typer.Option(None, help="Worker endpoint port (0 = any free)."),
    data_dir: Path | None = typer.Option(None, help="Key, admin token and SQLite file."),
    database_url: str | None = typer.Option(None, help="SQLAlchemy URL (default: SQLite)."),
    fee_bps: int | None = typer.Option(None, help="Network fee in basis points."),
    ready_file: Path | None = typer.Option(None, help="Write bound ports here once serving."),
    log_level: str = typer.Option("INFO", help="Logging level."),
) -> None:
    overrides: dict[str, Any] = {
        "host": host,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "data_dir": data_dir,
        "database_url": database_url,
        "fee_bps": fee_bps,
        "ready_file": ready_file,
    }
    settings = CoordinatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    ctx.obj = settings
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    asyncio.run(Coordinator(settings).serve())


@app.command("add-client")
def add_client(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Client name."),
    credit: int = typer.Option(0, help="Initial credit in micro-units."),
) -> None:
    """Create a client and print a new API key for it (shown once)."""
    coord = Coordinator(_settings(ctx))
    key = coord.accounts.create_client(name, credit)
    console.print(f"client {name}: balance {format_micro(coord.accounts.balance(name))}")
    print(key)


@app.command("balances")
def balances(ctx: typer.Context) -> None:
    """Every ledger account and its balance."""
    coord = Coordinator(_settings(ctx))
    table = Table("account", "balance (micro-units)", "balance")
    for name, amount in sorted(coord.accounts.balances().items()):
        table.add_row(name, str(amount), format_micro(amount))
    console.print(table)
