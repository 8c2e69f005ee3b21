"""`agora payouts …`: close an epoch into signed statements (JSON + CSV), list, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from billing.payouts import SignedStatement, statements_csv, verify_statement
from billing.pricing import format_micro
from coordinator.config import CoordinatorSettings
from coordinator.services.payouts import Payouts
from coordinator.store.db import make_engine, migrate
from protocol.identity import Identity

app = typer.Typer(help="Provider payouts by epoch.", no_args_is_help=True)
console = Console()
DataDir = typer.Option(None, help="The coordinator's data dir (its key; SQLite by default).")
DatabaseUrl = typer.Option(None, help="SQLAlchemy URL (e.g. PostgreSQL).")


def _payouts(data_dir: Path | None, database_url: str | None) -> Payouts:
    overrides: dict[str, Any] = {"data_dir": data_dir, "database_url": database_url}
    settings = CoordinatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    return Payouts(engine, Identity.load(settings.data_dir / "coordinator.key"))


def write_statements(out: Path, epoch: int, signed: list[SignedStatement]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    as_json = out / f"epoch-{epoch}.json"
    as_json.write_text(json.dumps({"epoch": epoch, "statements": [s.to_json() for s in signed]},
                                  indent=2) + "\n")  # fmt: skip
    as_csv = out / f"epoch-{epoch}.csv"
    as_csv.write_text(statements_csv([s.statement for s in signed]))
    return as_json, as_csv


@app.command("close")
def close(
    out: Path = typer.Option(Path("."), help="Where the statements are written."),
    data_dir: Path | None = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Close the open epoch: earnings move to paid; one signed statement per provider."""
    payouts = _payouts(data_dir, database_url)
    signed = payouts.close("cli")
    epoch = max(int(e["epoch"]) for e in payouts.epochs() if e["closed_at"] is not None)
    as_json, as_csv = write_statements(out, epoch, signed)
    table = Table("provider", "receipts", "paid")
    for s in (one.statement for one in signed):
        table.add_row(s.node_id, str(s.receipts), format_micro(s.amount))
    console.print(table)
    console.print(f"epoch {epoch} closed: {len(signed)} statement(s) in {as_json} and {as_csv}")


@app.command("list")
def list_epochs(data_dir: Path | None = DataDir, database_url: str | None = DatabaseUrl) -> None:
    """Every epoch, open or closed, and what it paid."""
    table = Table("epoch", "opened", "closed", "paid")
    for e in _payouts(data_dir, database_url).epochs():
        table.add_row(str(e["epoch"]), str(e["opened_at"]), str(e["closed_at"] or "open"),
                      format_micro(int(str(e["paid"]))))  # fmt: skip
    console.print(table)


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="epoch-N.json from `agora payouts close`."),
) -> None:
    """Check every statement's coordinator signature offline."""
    try:
        document = json.loads(file.read_text())
        statements = [
            verify_statement(SignedStatement.from_json(s)) for s in document["statements"]
        ]
    except Exception as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1) from exc
    total = sum(s.amount for s in statements)
    typer.echo(f"OK: {len(statements)} statement(s), {format_micro(total)} paid")
