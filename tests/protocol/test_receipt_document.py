"""The receipt document: every field it shows is checked against what was signed, so no
tampered count, price, worker, request id or amount passes `agora receipt verify`."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agora.cli import app
from billing.pricing import Price, Segment, segments_charge
from protocol.cache_hit import cache_hit_document
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.receipt import Receipt, countersign, sign_receipt
from protocol.receipt_document import UnsignedPart, receipt_document, verify_document

WORKER, RESCUER, COORDINATOR = Identity.generate(), Identity.generate(), Identity.generate()


def _signed(worker: Identity, request_id: str, completion: int, billed: tuple[int, int]) -> Any:
    receipt = Receipt(
        request_id=request_id, model="tiny", worker_id=worker.node_id, coordinator_nonce="00",
        prompt_sha256="p", output_sha256="o", prompt_tokens=7, completion_tokens=completion,
        price_prompt_per_mtok=100_000, price_completion_per_mtok=200_000, started_at_ms=1,
        ttft_ms=2, finished_at_ms=3, finish_reason="length",
    )  # fmt: skip
    return countersign(COORDINATOR, sign_receipt(worker, receipt), billed)


KILLED = UnsignedPart("r1", 0, WORKER.node_id, 7, 4, 100_000, 200_000)
FEE_BPS = 500


def document(amount: int | None = None) -> dict[str, Any]:
    """A continued request: the first worker died after 4 tokens (unsigned), then two
    signed segments; the amount is what the network's pricing makes of them."""
    signed = [(1, _signed(WORKER, "r1~1", 10, (7, 10))), (2, _signed(RESCUER, "r1~2", 6, (7, 6)))]
    if amount is None:
        price = Price(100_000, 200_000)
        parts = [Segment(KILLED.worker_id, price, 7, 4, verified=False)]
        for _i, r in signed:
            prompt, completion = r.billed or (0, 0)
            parts.append(Segment(r.receipt.worker_id, price, prompt, completion, verified=True))
        amount = segments_charge(parts, FEE_BPS)[0].total
    built = receipt_document(COORDINATOR, "r1", amount, FEE_BPS, signed, [KILLED])
    as_sent: dict[str, Any] = json.loads(json.dumps(built))
    return as_sent


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _both_amounts(doc: dict[str, Any]) -> None:
    doc["amount_total"] = doc["charge"]["amount_total"] = 1  # the statement's signature fails


TAMPERINGS = {
    "receipt.completion_tokens": _set(("receipt", "completion_tokens"), 99),
    "receipt.prompt_tokens": _set(("receipt", "prompt_tokens"), 1),
    "receipt.price_completion_per_mtok": _set(("receipt", "price_completion_per_mtok"), 1),
    "receipt.worker_id": _set(("receipt", "worker_id"), RESCUER.node_id),
    "request_id": _set(("request_id",), "r2"),
    "amount_total": _set(("amount_total",), 1),
    "billed": _set(("billed", "completion_tokens"), 1),
    "continuation's completion_tokens": _set(
        ("continuations", 0, "receipt", "completion_tokens"), 1
    ),
    "a continuation dropped": _set(("continuations",), []),
    "the unsigned segment dropped": _set(("unsigned_segments",), []),
    "the unsigned segment's tokens": _set(
        ("unsigned_segments", 0, "billed", "completion_tokens"), 1
    ),
    "the amount, in the document and in the statement": _both_amounts,
}


def test_an_untouched_document_verifies() -> None:
    verified = verify_document(document())
    assert verified.request_id == "r1"
    assert verified.amount_total == document()["amount_total"]
    assert [r.completion_tokens for r in verified.receipts] == [10, 6]
    assert [e["signed"] for e in verified.statement["segments"]] == [False, True, True]


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_every_shown_field_that_is_changed_fails_verification(name: str) -> None:
    tampered = copy.deepcopy(document())
    TAMPERINGS[name](tampered)
    with pytest.raises(ProtocolError):
        verify_document(tampered)


def test_the_cli_says_ok_or_invalid(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(document()))
    tampered = document()
    TAMPERINGS["receipt.completion_tokens"](tampered)
    bad.write_text(json.dumps(tampered))
    runner = CliRunner()
    ok = runner.invoke(app, ["receipt", "verify", str(good)])
    assert ok.exit_code == 0, ok.output
    assert f"paid {document()['amount_total']}" in ok.output
    refused = runner.invoke(app, ["receipt", "verify", str(bad)])
    assert refused.exit_code == 1
    assert "completion_tokens" in refused.output
    overcharged = tmp_path / "overcharged.json"  # signed, but more than its segments come to
    overcharged.write_text(json.dumps(document(amount=document()["amount_total"] + 1)))
    refused = runner.invoke(app, ["receipt", "verify", str(overcharged)])
    assert refused.exit_code == 1
    assert "add up" in refused.output


def test_the_cli_verifies_a_cache_hit_receipt(tmp_path: Path) -> None:
    coordinator = Identity.generate()
    hit = cache_hit_document(
        coordinator, request_id="r2", source_request_id="r1", model="tiny", prompt_tokens=5,
        completion_tokens=3, amount_total=7,
    )  # fmt: skip
    good, bad = tmp_path / "hit.json", tmp_path / "forged.json"
    good.write_text(json.dumps(hit))
    bad.write_text(json.dumps({**hit, "amount_total": 0}))
    runner = CliRunner()
    ok = runner.invoke(app, ["receipt", "verify", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "response cache (the answer of r1), paid 7" in ok.output
    refused = runner.invoke(app, ["receipt", "verify", str(bad)])
    assert refused.exit_code == 1
    assert "amount_total" in refused.output
