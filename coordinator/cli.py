"""`agora coordinator …`: run the market's gateway, and manage its clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import uvloop
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from billing.pricing import format_micro
from coordinator.app import Coordinator
from coordinator.cluster import ClusterError, ProcessGroup
from coordinator.config import CoordinatorSettings
from coordinator.observability import configure_logging

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
    p2p_listen: str | None = typer.Option(
        None, help="Join the p2p market: libp2p listen multiaddr, e.g. /ip4/0.0.0.0/tcp/4001."
    ),
    bootstrap: list[str] = typer.Option(
        [], help="A p2p bootstrap peer (multiaddr ending in /p2p/<id>); repeatable."
    ),
    public_grpc: str | None = typer.Option(
        None, help="host:port discovered workers dial (default: the bound gRPC address)."
    ),
    public_url: str | None = typer.Option(None, help="The OpenAI base URL peers advertise."),
    processes: int | None = typer.Option(
        None,
        help="Serve with N processes sharing the HTTP port (SO_REUSEPORT) and the "
        "database; workers hold a session with each. Use the host's cores (default 1).",
    ),
    log_level: str = typer.Option("INFO", help="Logging level."),
    log_format: str = typer.Option("json", help="json (one object per line) or text."),
) -> None:
    overrides: dict[str, Any] = {
        "host": host,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "data_dir": data_dir,
        "database_url": database_url,
        "fee_bps": fee_bps,
        "ready_file": ready_file,
        "p2p_listen": p2p_listen,
        "p2p_bootstrap": bootstrap or None,
        "public_grpc_target": public_grpc,
        "public_url": public_url,
        "processes": processes,
    }
    try:
        settings = CoordinatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise typer.BadParameter(problems) from exc
    ctx.obj = settings
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level, log_format)
    if settings.processes > 1:
        try:
            ProcessGroup(settings, log_level, log_format).run()
        except ClusterError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from exc
    else:
        uvloop.run(Coordinator(settings).serve())


@app.command("add-client")
def add_client(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Client name."),
    credit: int = typer.Option(0, help="Initial credit in micro-units."),
    rpm: int | None = typer.Option(None, help="Requests per minute for this key."),
    tpm: int | None = typer.Option(None, help="Tokens per minute for this key."),
) -> None:
    """Create a client (or add a key to one) and print the new API key (shown once)."""
    coord = Coordinator(_settings(ctx))
    key = coord.accounts.create_client(name, credit, rpm, tpm)
    console.print(f"client {name}: balance {format_micro(coord.accounts.balance(name))}")
    print(key)


@app.command("keys")
def keys(
    ctx: typer.Context, client: str | None = typer.Option(None, help="Only this client's.")
) -> None:
    """List API keys (their prefixes; secrets are never stored)."""
    table = Table("id", "prefix", "client", "created", "revoked", "rpm", "tpm")
    for k in Coordinator(_settings(ctx)).accounts.list_keys(client):
        table.add_row(
            str(k.id), k.prefix, k.client, f"{k.created_at:%Y-%m-%d %H:%M}", str(k.revoked),
            str(k.rpm_limit or "-"), str(k.tpm_limit or "-"),
        )  # fmt: skip
    console.print(table)


@app.command("revoke-key")
def revoke_key(ctx: typer.Context, key_id: int = typer.Argument(..., help="Key id.")) -> None:
    """Revoke an API key (other coordinators see it within seconds)."""
    info = Coordinator(_settings(ctx)).accounts.revoke_key(key_id)
    console.print(f"revoked key {info.id} ({info.prefix}…) of {info.client}")


@app.command("balances")
def balances(ctx: typer.Context) -> None:
    """Every ledger account and its balance."""
    coord = Coordinator(_settings(ctx))
    table = Table("account", "balance (micro-units)", "balance")
    for name, amount in sorted(coord.accounts.balances().items()):
        table.add_row(name, str(amount), format_micro(amount))
    console.print(table)
