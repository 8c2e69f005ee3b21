"""`agora policies …`: clients' policies on a running coordinator, through its admin API
(/admin/v1/policies): save one from a JSON file (a new version when it changed), attach it to
a client or an API key, list them, and see what they did lately."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.models_cli import DataDir, Token, Url, admin_call

app = typer.Typer(help="Policies: redaction, output blocking, provider rules.",
                  no_args_is_help=True)  # fmt: skip
console = Console()
BASE = "/admin/v1/policies"


@app.command("list")
def list_policies(
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir
) -> None:
    """Every policy's newest version, its steps, and whom it runs for."""
    view = admin_call("GET", url, admin_token, data_dir, "", base=BASE)
    table = Table("policy", "version", "sha256", "steps", "runs for", title="Policies")
    for p in view["policies"]:
        steps = ", ".join(f"{s['kind']}({'/'.join(s['points'])})" for s in p.get("steps", []))
        runs_for = ", ".join(p["attached"]) or "—"
        table.add_row(p["name"], str(p.get("version", "—")), p.get("sha256", "")[:16],
                      steps or f"[red]{p.get('error')}[/]", runs_for)  # fmt: skip
    console.print(table)


@app.command("set")
def set_policy(
    name: str = typer.Argument(..., help="The policy's name."),
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help='JSON: {"steps": [...]}'),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Save a policy from a JSON file; its steps are checked before it is stored."""
    try:
        spec: dict[str, Any] = json.loads(file.read_text())
    except ValueError as exc:
        console.print(f"[red]error:[/] {file} is not JSON: {exc}")
        raise typer.Exit(1) from exc
    saved = admin_call("PUT", url, admin_token, data_dir, f"/{name}", spec, base=BASE)
    console.print(f"policy [bold]{saved['name']}[/] v{saved['version']} sha256 {saved['sha256']}")


@app.command("attach")
def attach(
    name: str = typer.Argument(..., help="The policy (see `agora policies list`)."),
    client: str | None = typer.Option(None, help="Every key of this client."),
    key_id: int | None = typer.Option(None, help="This API key (its own policy wins)."),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Run a policy for a client or one of its keys."""
    body = {"policy": name, "client": client, "key_id": key_id}
    done = admin_call("POST", url, admin_token, data_dir, "/attach", body, base=BASE)
    console.print(f"{done['subject']} runs policy {name}")


@app.command("detach")
def detach(
    client: str | None = typer.Option(None, help="The client whose own policy is removed."),
    key_id: int | None = typer.Option(None, help="The key whose own policy is removed."),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Remove a client's or a key's own policy."""
    body = {"policy": None, "client": client, "key_id": key_id}
    done = admin_call("POST", url, admin_token, data_dir, "/attach", body, base=BASE)
    console.print(f"{done['subject']} runs no policy of its own")


@app.command("hits")
def hits(url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir) -> None:
    """What policies did lately (counts by kind; the values found are never kept)."""
    view = admin_call("GET", url, admin_token, data_dir, "/hits", base=BASE)
    table = Table("policy", "step", "entity", "action", "count", title="Policy actions")
    for h in view["hits"]:
        table.add_row(h["policy"], h["step"], h["entity"], h["action"], str(h["count"]))
    console.print(table)
    console.print("requests acted on: " + (", ".join(
        f"{p} {n}" for p, n in sorted(view["requests"].items())) or "none"))  # fmt: skip
