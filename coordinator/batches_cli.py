"""`agora batches`: the operator's view of every client's batches (GET /admin/v1/batches, what
the dashboard's batch panel reads)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.config import default_data_dir
from coordinator.status_cli import admin_get, admin_token_of

console = Console()


def show(view: dict[str, Any]) -> None:
    table = Table("batch", "client", "model", "status", "done", "failed", "total", "created",
                  title="Batches")  # fmt: skip
    for b in view["batches"]:
        counts = b["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(b["created_at"]))
        table.add_row(b["id"], b["client"], b["model"], b["status"], str(counts["completed"]),
                      str(counts["failed"]), str(counts["total"]), created)  # fmt: skip
    console.print(table)
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(view["by_status"].items())) or "none"
    console.print(f"by status: {by_status}; lines running now {view['running_lines']} "
                  f"(queued {view['queued_lines']}) on {view['model_slots']} slots of their "
                  f"models, {view['headroom_share']:.0%} kept for online traffic")  # fmt: skip


def batches(
    url: str = typer.Option("http://127.0.0.1:8080", help="The coordinator's HTTP address."),
    admin_token: str | None = typer.Option(
        None, envvar="AGORA_ADMIN_TOKEN", help="Admin token (default: DATA_DIR/admin_token)."
    ),
    data_dir: Path = typer.Option(default_data_dir(), help="The coordinator's data directory."),
    limit: int = typer.Option(50, min=1, max=10_000, help="Most recent batches shown."),
) -> None:
    """Every client's batches: status, progress, and what they use of the market now."""
    token = admin_token_of(admin_token, data_dir)
    show(admin_get(url, token, "/batches", {"limit": limit}))
