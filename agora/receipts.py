"""`agora receipt verify FILE`: check a receipt's signatures offline."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from protocol.errors import ProtocolError
from protocol.receipt import SignedReceipt, verify_receipt

app = typer.Typer(help="Signed receipts.", no_args_is_help=True)


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="Receipt JSON from GET /v1/receipts/{id}."),
) -> None:
    """Verify the worker's signature and the coordinator's countersignature."""
    try:
        receipt = verify_receipt(SignedReceipt.from_json(json.loads(file.read_text())))
    except (ProtocolError, ValueError) as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"OK: request {receipt.request_id}, model {receipt.model}, "
        f"{receipt.prompt_tokens}+{receipt.completion_tokens} tokens, "
        f"worker {receipt.worker_id}"
    )
