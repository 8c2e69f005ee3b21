"""Payout statements: what a closed epoch paid one provider, signed by the coordinator so the
provider (or anyone) can re-verify it offline. Pure values; the store decides what is owed."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from billing.ledger import AccountKind, Posting, account_kind, payout_txid, provider_account
from protocol.canonical import canonical_json, parse_canonical
from protocol.identity import Identity, public_key_from_node_id, verify_signature

_DOMAIN = b"agora-payout-statement-v1\0"
CSV_FIELDS = ("epoch", "node_id", "period_start", "period_end", "amount", "receipts", "model",
              "model_amount", "coordinator_id")  # fmt: skip


@dataclass(frozen=True)
class Statement:
    epoch: int
    node_id: str
    period_start: str  # ISO 8601, UTC
    period_end: str
    amount: int  # micro-units moved from the provider's earnings to "paid"
    receipts: int  # countersigned receipts it earned by in this epoch
    by_model: dict[str, int] = field(default_factory=dict)  # what those receipts earned, per model
    coordinator_id: str = ""

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self))


@dataclass(frozen=True)
class SignedStatement:
    body: bytes  # Statement.to_bytes(), exactly as signed
    signature: bytes

    @property
    def statement(self) -> Statement:
        value = parse_canonical(self.body)
        return Statement(**value)

    def to_json(self) -> dict[str, Any]:
        return {
            "statement": parse_canonical(self.body),
            "body_b64": base64.b64encode(self.body).decode(),
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> SignedStatement:
        return cls(
            base64.b64decode(value["body_b64"], validate=True),
            base64.b64decode(value["signature"], validate=True),
        )


def sign_statement(identity: Identity, statement: Statement) -> SignedStatement:
    if statement.coordinator_id != identity.node_id:
        raise ValueError("a statement must name the coordinator that signs it")
    body = statement.to_bytes()
    return SignedStatement(body, identity.sign(_DOMAIN + body))


def verify_statement(signed: SignedStatement) -> Statement:
    """Check the coordinator's signature (its key is inside its id); raise on any failure."""
    statement = signed.statement
    key = public_key_from_node_id(statement.coordinator_id)
    verify_signature(key, signed.signature, _DOMAIN + signed.body)
    if sum(statement.by_model.values()) > statement.amount:
        raise ValueError("the per-model earnings exceed the amount paid")
    return statement


def statements_csv(statements: Sequence[Statement]) -> str:
    """One row per provider and model (a provider with no receipts gets one row)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for s in statements:
        models = sorted(s.by_model.items()) or [("", 0)]
        for model, amount in models:
            writer.writerow({
                "epoch": s.epoch, "node_id": s.node_id, "period_start": s.period_start,
                "period_end": s.period_end, "amount": s.amount, "receipts": s.receipts,
                "model": model, "model_amount": amount, "coordinator_id": s.coordinator_id,
            })  # fmt: skip
    return out.getvalue()


def check_statements(
    postings_by_tx: Mapping[str, Sequence[Posting]], statements: Sequence[Statement]
) -> list[str]:
    """Statements and payout postings, one to one and to the micro-unit."""
    problems: list[str] = []
    stated = {payout_txid(s.epoch, s.node_id): s for s in statements}
    for txid in postings_by_tx:
        if txid.startswith("payout:") and txid not in stated:
            problems.append(f"{txid} was paid without a statement")
    for txid, s in stated.items():
        paid = postings_by_tx.get(txid)
        if paid is None:
            problems.append(f"statement for epoch {s.epoch}, {s.node_id} has no payout posting")
            continue
        debited = -sum(
            p.amount
            for p in paid
            if account_kind(p.account) is AccountKind.PROVIDER
            and p.account == provider_account(s.node_id)
        )
        if debited != s.amount:
            problems.append(f"{txid}: statement says {s.amount}, postings moved {debited}")
    return problems
