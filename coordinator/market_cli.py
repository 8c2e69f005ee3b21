"""`agora market`: the demand board of a running coordinator (GET /v1/market, public):
where demand goes unmet and what it pays, per model, for providers deciding what to serve."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.canonical import canonical_json
from protocol.errors import ProtocolError
from protocol.market import DemandBoard

console = Console()
WINDOWS = ("60s", "300s", "3600s")


def _price(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def show(view: dict[str, Any], window: str) -> None:
    board = view["body"]["board"]
    who = view["body"]["coordinator_id"][-8:]
    table = Table("model", "req/s", "served", "unmet (cap / price)", "queue", "mean wait",
                  "price p50 (completion)", "workers", "slots in use",
                  title=f"Demand over {window} (coordinator …{who})")  # fmt: skip
    for model, row in board["models"].items():
        w, cap = row["windows"][window], row["capacity"]
        wait = "—" if w["mean_wait_ms"] is None else f"{w['mean_wait_ms']} ms"
        used = "—" if cap["utilisation_bps"] is None else f"{cap['in_use']}/{cap['slots']}"
        price = _price(w["clearing_price"]["completion"]["p50"])
        name = escape(model) + (" [bold red]wanted[/]" if row.get("wanted") else "")
        table.add_row(name, f"{w['requests'] / max(1, w['window_s']):.3f}",
                      str(w["requests"]),
                      f"{w['unmet']['capacity']} / {w['unmet']['price']}",
                      str(row["queue_depth"]), wait, price, str(cap["workers"]), used)  # fmt: skip
    console.print(table)


def market(
    url: str = typer.Option("http://127.0.0.1:8080", help="The coordinator's HTTP address."),
    window: str = typer.Option("300s", help="60s, 300s or 3600s."),
    as_json: bool = typer.Option(False, "--json", help="Print the signed board as JSON."),
) -> None:
    """The demand board: requests, unmet demand, clearing prices and capacity per model
    (signature checked)."""
    if window not in WINDOWS:
        console.print(f"[red]error:[/] no window {window} ({', '.join(WINDOWS)})")
        raise typer.Exit(2)
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/market", timeout=30)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] cannot read the market at {url}: {exc}")
        raise typer.Exit(1) from exc
    view: dict[str, Any] = response.json()
    try:
        _verified(view)
    except (ProtocolError, KeyError, TypeError) as exc:
        console.print(f"[red]error:[/] the board does not verify: {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        console.print_json(json.dumps(view))
        return
    show(view, window)
    for peer in view.get("peers") or ():
        try:  # a peer's board as it signed it: shown only if it verifies and reads
            _verified(peer)
            show(peer, window)
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            console.print(f"[yellow]skipped a peer board:[/] {escape(str(exc))}")


def _verified(view: dict[str, Any]) -> None:
    """Raise unless the board is signed by the coordinator it names and is fresh now."""
    sealed = canonical_json({"body": view["body"], "signature": view["signature"]})
    DemandBoard.open(sealed, time.time_ns() // 1_000_000, 120_000)
