"""`agora models …`: the model catalogue of a running coordinator, through its admin API
(/admin/v1/models): list, create, add a version, release (canary, A/B, shadow), promote,
roll back, history; and the LoRA adapters versions run with (/admin/v1/adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from coordinator.config import default_data_dir
from coordinator.status_cli import admin_token_of
from protocol.adapter import pack
from protocol.errors import MalformedMessage

app = typer.Typer(help="Public models, their versions and releases.", no_args_is_help=True)
console = Console()
Url = typer.Option("http://127.0.0.1:8080", help="The coordinator's HTTP address.")
Token = typer.Option(
    None, envvar="AGORA_ADMIN_TOKEN", help="Admin token (default: DATA_DIR/admin_token)."
)
DataDir = typer.Option(default_data_dir(), help="The coordinator's data directory.")


def admin_call(
    method: str, url: str, token: str | None, data_dir: Path, path: str,
    body: dict[str, Any] | None = None, *, base: str = "/admin/v1/models",
    content: bytes | None = None, params: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    secret = admin_token_of(token, data_dir)
    headers = {"Authorization": f"Bearer {secret}"}
    if content is not None:
        headers["Content-Type"] = "application/x-tar"
    try:
        response = httpx.request(
            method, f"{url.rstrip('/')}{base}{path}", json=body, content=content,
            params=params, timeout=300, headers=headers,
        )  # fmt: skip
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] cannot reach the coordinator at {url}: {exc}")
        raise typer.Exit(1) from exc
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        console.print(f"[red]error:[/] {response.status_code} {message}")
        raise typer.Exit(1)
    result: dict[str, Any] = response.json()
    return result


def _show(model: dict[str, Any]) -> None:
    table = Table("version", "serves", "weight", "share", "state", "requests", "error rate",
                  "TTFT p95", title=f"{model['name']} (stable {model['stable']}"
                  + (", sticky A/B" if model["sticky"] else "") + ")")  # fmt: skip
    for v in model["versions"]:
        window = v["window"]
        p95 = window["ttft_p95_ms"]
        table.add_row(
            v["version"] + (" *" if v["stable"] else ""), v["serves"], str(v["weight"]),
            f"{v['share']:.0%}", v["state"], str(window["requests"]),
            f"{window['error_rate']:.1%}", "—" if p95 is None else f"{p95:.0f} ms",
        )  # fmt: skip
    console.print(table)
    shadow = model["shadow"]
    if shadow["version"]:
        console.print(f"shadow: {shadow['share']:.0%} of requests copied to {shadow['version']}")


def _parse_weights(pairs: list[str]) -> dict[str, int]:
    weights = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not weight.isdigit():
            raise typer.BadParameter(f"`{pair}`: give VERSION=WEIGHT, e.g. v2=5")
        weights[version] = int(weight)
    return weights


@app.command("list")
def list_models(url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir) -> None:
    """Every public model with its versions and how each is doing."""
    models = admin_call("GET", url, admin_token, data_dir, "")["models"]
    if not models:
        console.print("no models in the catalogue yet: `agora models create NAME VERSION=SERVED`")
    for model in models:
        _show(model)


@app.command("create")
def create(
    name: str = typer.Argument(..., help="The public name clients ask for."),
    versions: list[str] = typer.Argument(
        ..., help="VERSION=SERVED_MODEL[+ADAPTER_SHA256], the first is stable."
    ),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """A public model whose first version takes all traffic."""
    specs = []
    for item in versions:
        version, sep, served = item.partition("=")
        serves, plus, adapter = served.partition("+")
        if not sep or not version or not serves or (plus and not adapter):
            raise typer.BadParameter(f"`{item}`: give VERSION=SERVED_MODEL, e.g. v1=llama-3-8b")
        specs.append({"version": version, "serves": serves, **_adapter(adapter or None)})
    _show(admin_call("POST", url, admin_token, data_dir, "", {"name": name, "versions": specs}))


@app.command("add-version")
def add_version(
    name: str, version: str, serves: str = typer.Option(..., help="The served-model name."),
    adapter: str | None = typer.Option(None, help="SHA-256 of a registered LoRA adapter."),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """A new version at weight 0 (release it to give it traffic)."""
    body = {"version": version, "serves": serves, **_adapter(adapter)}
    _show(admin_call("POST", url, admin_token, data_dir, f"/{name}/versions", body))


@app.command("release")
def release(
    name: str,
    weights: list[str] = typer.Argument(None, help="VERSION=WEIGHT …, e.g. v1=95 v2=5"),
    sticky: bool | None = typer.Option(None, "--sticky/--no-sticky", help="A/B per API key."),
    shadow: str | None = typer.Option(None, help="VERSION=SHARE to copy, e.g. v3=0.1; 'off'."),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Change the release: canary weights, sticky A/B, shadow traffic."""
    body: dict[str, Any] = {}
    if weights:
        body["weights"] = _parse_weights(weights)
    if sticky is not None:
        body["sticky"] = sticky
    if shadow is not None:
        version, _, share = shadow.partition("=")
        body["shadow"] = (
            {"version": None} if shadow == "off" else {"version": version, "share": float(share)}
        )
    _show(admin_call("POST", url, admin_token, data_dir, f"/{name}/release", body))


@app.command("promote")
def promote(
    name: str, version: str, url: str = Url, admin_token: str | None = Token,
    data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Make VERSION the stable one, with all the traffic."""
    _show(admin_call("POST", url, admin_token, data_dir, f"/{name}/promote", {"version": version}))


@app.command("rollback")
def rollback(
    name: str,
    version: str | None = typer.Argument(None, help="Default: every version but the stable."),
    reason: str = typer.Option("by hand", help="Why (kept in the history and audit log)."),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Take a version (or every candidate) out of traffic now."""
    body = {"version": version, "reason": reason}
    _show(admin_call("POST", url, admin_token, data_dir, f"/{name}/rollback", body))


@app.command("history")
def history(
    name: str, limit: int = 50, as_json: bool = typer.Option(False, "--json"),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """What happened to NAME's releases, newest first (automatic rollbacks and why)."""
    events = admin_call("GET", url, admin_token, data_dir, f"/{name}/history?limit={limit}")[
        "events"
    ]
    if as_json:
        typer.echo(json.dumps(events, indent=2))
        return
    table = Table("at", "event", "version", "by", "detail", title=f"{name}: release history")
    for e in events:
        detail = e["detail"].get("reason") or json.dumps(e["detail"], sort_keys=True)
        table.add_row(e["at"][:19], e["kind"], e["version"], e["actor"], detail)
    console.print(table)


def _adapter(sha256: str | None) -> dict[str, str]:
    return {"adapter_sha256": sha256} if sha256 else {}


@app.command("add-adapter")
def add_adapter(
    folder: Path = typer.Argument(..., help="The adapter folder (adapter_config.json, …)."),
    name: str = typer.Option(..., help="What to call it."),
    base: str = typer.Option(..., help="The served model it applies to."),
    url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir,
) -> None:  # fmt: skip
    """Register a LoRA adapter: its canonical archive goes to the coordinator, which names it
    by SHA-256 (use that hash in a version: `create NAME v1=BASE+SHA256`)."""
    try:
        archive = pack(folder)
    except MalformedMessage as exc:
        raise typer.BadParameter(str(exc)) from exc
    card = admin_call("POST", url, admin_token, data_dir, "", base="/admin/v1/adapters",
                 content=archive, params={"name": name, "base_model": base})  # fmt: skip
    console.print(f"{card['sha256']}  {card['name']} on {card['base_model']}, "
                  f"{card['size_bytes']} bytes")  # fmt: skip


@app.command("adapters")
def adapters(url: str = Url, admin_token: str | None = Token, data_dir: Path = DataDir) -> None:
    """The registered LoRA adapters."""
    cards = admin_call("GET", url, admin_token, data_dir, "", base="/admin/v1/adapters")["adapters"]
    table = Table("sha256", "name", "base model", "bytes", "registered", title="LoRA adapters")
    for c in cards:
        table.add_row(c["sha256"], c["name"], c["base_model"], str(c["size_bytes"]),
                      c["created_at"])  # fmt: skip
    console.print(table)
