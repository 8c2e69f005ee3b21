"""`agora receipt verify FILE`: check a receipt document offline: every signature, every shown
field, and that its segments add up to the amount charged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from billing.pricing import Price, Segment, segments_charge
from protocol.cache_hit import verify_cache_hit
from protocol.errors import ProtocolError
from protocol.receipt_document import verify_document

app = typer.Typer(help="Signed receipts.", no_args_is_help=True)


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="Receipt JSON from GET /v1/receipts/{id}."),
) -> None:
    """Verify every signature, and that every field shown is the one signed: each segment's
    receipt against its worker's and the coordinator's signatures, the request id and the
    amount paid against the coordinator's signed charge statement."""
    try:
        document = json.loads(file.read_text())
        if isinstance(document, dict) and document.get("cache_hit"):
            hit = verify_cache_hit(document)
            typer.echo(
                f"OK: request {hit['request_id']}, model {hit['model']}, answered from the "
                f"response cache (the answer of {hit['source_request_id']}), paid "
                f"{hit['amount_total']}, coordinator {hit['coordinator_id']}"
            )
            return
        verified = verify_document(document)
        charged = statement_total(verified.statement)
    except (ProtocolError, ValueError, KeyError, TypeError) as exc:
        typer.echo(f"INVALID: {exc}", err=True)
        raise typer.Exit(1) from exc
    if charged != verified.amount_total:
        typer.echo(f"INVALID: the segments add up to {charged}, not the {verified.amount_total} "
                   "charged", err=True)  # fmt: skip
        raise typer.Exit(1)
    first = verified.receipts[0]
    completion = sum(r.completion_tokens for r in verified.receipts)
    typer.echo(
        f"OK: request {verified.request_id}, model {first.model}, "
        f"{first.prompt_tokens}+{completion} tokens signed in {len(verified.receipts)} "
        f"segment(s), paid {verified.amount_total}, worker {first.worker_id}"
    )


def statement_total(statement: dict[str, Any]) -> int:
    """The amount the signed segments and fee come to, by the network's own pricing rule."""
    segments = [
        Segment(
            str(e["worker_id"]),
            Price(int(e["price_prompt_per_mtok"]), int(e["price_completion_per_mtok"]),
                  int(e.get("price_cached_prompt_per_mtok", e["price_prompt_per_mtok"]))),
            int(e["billed"]["prompt_tokens"]), int(e["billed"]["completion_tokens"]),
            verified=bool(e["signed"]),
            cached_tokens=int(e["billed"].get("cached_prompt_tokens", 0)),
        )
        for e in statement["segments"]
    ]  # fmt: skip
    charge, _earned = segments_charge(segments, int(statement["fee_bps"]))
    return charge.total
