"""`agora status`: the operator dashboard's numbers as rich tables, from the same API
(GET /admin/v1/overview) the dashboard reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from billing.pricing import format_micro
from coordinator.config import default_data_dir

console = Console()
SLOTS = ("workers", "total", "in_use", "free")


def admin_token_of(token: str | None, data_dir: Path) -> str:
    if token:
        return token
    path = data_dir / "admin_token"
    if not path.exists():
        console.print(f"[red]error:[/] no admin token: pass --admin-token or point --data-dir "
                      f"at the coordinator's data directory ({path} does not exist)")  # fmt: skip
        raise typer.Exit(1)
    return path.read_text().strip()


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"


def show(overview: dict[str, Any]) -> None:
    capacity = Table("model", "workers", "total", "in use", "free", title="Capacity by model")
    for row in overview["capacity"]["by_model"]:
        capacity.add_row(
            row["model"], *(str(row[k]) for k in ("workers", "total", "in_use", "free"))
        )
    gpus = Table("GPU type", "GPUs", "workers", "total", "in use", "free", title="Capacity by GPU")
    for row in overview["capacity"]["by_gpu"]:
        gpus.add_row(
            row["gpu"], *(str(row[k]) for k in ("workers", "gpus", "total", "in_use", "free"))
        )
    workers = Table("node", "status", "model", "GPU", "load", "TTFT", "ITL", "reputation",
                    "last seen", title="Workers")  # fmt: skip
    for w in overview["workers"]:
        rep = w["reputation"]
        trust = (
            "—"
            if rep is None
            else f"{rep['score']:.2f}" + (" (probation)" if rep["probation"] else "")
        )
        for model, s in w["models"].items():
            workers.add_row(w["node_id"][-12:], w["status"], model, w["gpu"],
                            f"{s['in_flight']}/{s['max_concurrency']}", _ms(s["ttft_s"]),
                            _ms(s["itl_s"]), trust, f"{w['last_seen_s']} s")  # fmt: skip
    money = overview["money"]
    books = Table("", "amount", title=f"Money ({overview['settled_requests']} requests settled)")
    for key in ("revenue", "fees", "provider_earnings", "owed_to_providers", "paid_out"):
        books.add_row(key.replace("_", " "), format_micro(money[key]))
    clients = Table("client", "spent", "balance", title="Top clients")
    for c in overview["top_clients"]:
        clients.add_row(c["client"], format_micro(c["spent"]), format_micro(c["balance"]))
    for table in (capacity, gpus, workers, books, clients):
        console.print(table)


def status(
    url: str = typer.Option("http://127.0.0.1:8080", help="The coordinator's HTTP address."),
    admin_token: str | None = typer.Option(
        None, envvar="AGORA_ADMIN_TOKEN", help="Admin token (default: DATA_DIR/admin_token)."
    ),
    data_dir: Path = typer.Option(default_data_dir(), help="The coordinator's data directory."),
) -> None:
    """The market at a glance: capacity, workers, money, top clients."""
    show(admin_get(url, admin_token_of(admin_token, data_dir), "/overview"))


def admin_get(
    url: str, token: str, path: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """GET an admin API path (under /admin/v1) as JSON; a clear error and exit 1 otherwise."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/admin/v1{path}", params=params, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] cannot reach the coordinator at {url}: {exc}")
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        console.print(f"[red]error:[/] {response.status_code} {response.text}")
        raise typer.Exit(1)
    result: dict[str, Any] = response.json()
    return result
