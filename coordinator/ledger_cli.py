"""`agora ledger …`: the operator's audit of the books."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from coordinator.config import CoordinatorSettings
from coordinator.services.audit import audit_ledger
from coordinator.store.db import make_engine

app = typer.Typer(help="Audit the ledger.", no_args_is_help=True)
console = Console(soft_wrap=True)  # one problem per line, never wrapped


@app.command("check")
def check(
    data_dir: Path | None = typer.Option(None, help="The coordinator's data dir (SQLite)."),
    database_url: str | None = typer.Option(None, help="SQLAlchemy URL (e.g. PostgreSQL)."),
) -> None:
    """Postings balance, stored balances equal their postings, no client or provider below
    zero, receipts and request postings one to one. Exit 1 on any problem."""
    overrides: dict[str, Any] = {"data_dir": data_dir, "database_url": database_url}
    settings = CoordinatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    engine = make_engine(settings.resolved_database_url)
    try:
        problems = audit_ledger(engine)
    finally:
        engine.dispose()
    for problem in problems:
        console.print(f"[red]✗[/] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print("[green]✓[/] ledger is sound")
