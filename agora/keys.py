"""`agora keys …`: node identities."""

from __future__ import annotations

from pathlib import Path

import typer

from protocol.errors import KeyFileError
from protocol.identity import Identity
from worker_node.config import default_key_path

app = typer.Typer(help="Ed25519 node identities.", no_args_is_help=True)


@app.command("new")
def new(path: Path = typer.Option(default_key_path, help="Where to write the key (0600).")) -> None:
    """Create a node key; prints its node id."""
    try:
        identity = Identity.generate()
        identity.save(path)
    except KeyFileError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"node id {identity.node_id}\nkey     {path}")


@app.command("show")
def show(path: Path = typer.Option(default_key_path, help="Key file.")) -> None:
    """Print the node id of a key."""
    try:
        typer.echo(Identity.load(path).node_id)
    except KeyFileError as exc:
        raise typer.BadParameter(str(exc)) from exc
