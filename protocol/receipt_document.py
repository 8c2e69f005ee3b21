"""The receipt document a client gets (`GET /v1/receipts/{id}`) and checks offline
(`agora receipt verify`): every segment's signed receipt, and the coordinator's signed charge
statement that ties them to what the client paid.

Nothing shown is taken on trust: the decoded fields beside each receipt are compared with the
signed bytes, the charge statement (request id, amount paid, each segment's receipt digest and
billed counts, the prices the worker signed) is signed by the coordinator, and the document's
top-level request id and amount must be the statement's.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from protocol.canonical import canonical_json, parse_canonical
from protocol.errors import MalformedMessage
from protocol.identity import Identity, public_key_from_node_id, verify_signature
from protocol.receipt import Receipt, SignedReceipt, billed_cached_tokens, verify_receipt

_CHARGE_DOMAIN = b"agora-charge-v1\0"


@dataclass(frozen=True)
class UnsignedPart:
    """A segment whose worker delivered tokens to the client and died before signing."""

    request_id: str
    segment: int
    worker_id: str
    prompt_tokens: int  # billed
    completion_tokens: int
    price_prompt_per_mtok: int
    price_completion_per_mtok: int

    def to_json(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "signed": False,
            "request_id": self.request_id,
            "worker_id": self.worker_id,
            "billed": {"prompt_tokens": self.prompt_tokens,
                       "completion_tokens": self.completion_tokens},
            "price_prompt_per_mtok": self.price_prompt_per_mtok,
            "price_completion_per_mtok": self.price_completion_per_mtok,
        }  # fmt: skip


def _signed_entry(segment: int, signed: SignedReceipt) -> dict[str, Any]:
    receipt = signed.receipt
    billed = signed.billed or (receipt.prompt_tokens, receipt.completion_tokens)
    entry: dict[str, Any] = {
        "segment": segment,
        "signed": True,
        "request_id": receipt.request_id,
        "worker_id": receipt.worker_id,
        "receipt_sha256": hashlib.sha256(signed.body).hexdigest(),
        "billed": {"prompt_tokens": billed[0], "completion_tokens": billed[1]},
        "price_prompt_per_mtok": receipt.price_prompt_per_mtok,
        "price_completion_per_mtok": receipt.price_completion_per_mtok,
    }
    cached = billed_cached_tokens(receipt, billed[0])
    if cached:  # of the billed prompt tokens, those at the cached price the worker signed
        entry["billed"]["cached_prompt_tokens"] = cached
        entry["price_cached_prompt_per_mtok"] = receipt.price_cached_prompt_per_mtok
    return entry


def charge_statement(
    request_id: str,
    amount_total: int,
    fee_bps: int,
    signed: list[tuple[int, SignedReceipt]],
    unsigned: list[UnsignedPart],
    policy: str = "",
) -> dict[str, Any]:
    """What the coordinator asserts the client paid for a request: every segment in order,
    signed by its worker or not (tokens a worker delivered before it died are the client's,
    and charged, though no receipt exists for them), and the network fee applied. The amount
    follows from these by billing.pricing.segments_charge."""
    entries = [_signed_entry(i, r) for i, r in signed] + [u.to_json() for u in unsigned]
    statement = {
        "request_id": request_id,
        "amount_total": amount_total,
        "fee_bps": fee_bps,
        "segments": sorted(entries, key=lambda e: int(e["segment"])),
    }
    if policy:  # the client's policy version that ran (its SHA-256; never its findings)
        statement["policy_sha256"] = policy
    return statement


def sign_statement(identity: Identity, statement: dict[str, Any]) -> str:
    return base64.b64encode(identity.sign(_CHARGE_DOMAIN + canonical_json(statement))).decode()


def receipt_document(
    identity: Identity,
    request_id: str,
    amount_total: int,
    fee_bps: int,
    signed: list[tuple[int, SignedReceipt]],
    unsigned: list[UnsignedPart],
    policy: str = "",
) -> dict[str, Any]:
    """The document for a request: its first signed receipt at the top (as before), the other
    signed ones as continuations, the unsigned segments, and the signed charge statement."""
    statement = charge_statement(request_id, amount_total, fee_bps, signed, unsigned, policy)
    receipts = [r for _i, r in signed]
    shown_policy = {"policy_sha256": policy} if policy else {}
    return {
        "object": "receipt",
        "request_id": request_id,
        "amount_total": amount_total,
        **shown_policy,
        **receipts[0].to_json(),
        "continuations": [r.to_json() for r in receipts[1:]],
        "unsigned_segments": [u.to_json() for u in unsigned],
        "charge": statement,
        "charge_signature": sign_statement(identity, statement),
    }


@dataclass(frozen=True)
class Verified:
    request_id: str
    amount_total: int
    receipts: list[Receipt]
    statement: dict[str, Any]  # the signed charge statement (segments, fee), checked


def _shown_matches(shown: dict[str, Any], signed: SignedReceipt, where: str) -> Receipt:
    receipt = verify_receipt(signed)
    decoded = parse_canonical(signed.body)
    if shown.get("receipt") != decoded:
        differing = sorted(
            k for k in set(decoded) | set(shown.get("receipt") or {})
            if (shown.get("receipt") or {}).get(k) != decoded.get(k)
        )  # fmt: skip
        raise MalformedMessage(f"{where}: shown receipt fields differ from the signed ones: "
                               f"{', '.join(differing) or 'receipt'}")  # fmt: skip
    return receipt


def verify_document(document: dict[str, Any]) -> Verified:
    """Check every signature and every shown field; raise a ProtocolError on any difference."""
    try:
        parts = [document, *list(document.get("continuations") or ())]
        signed = [SignedReceipt.from_json(part) for part in parts]
        receipts = [
            _shown_matches(part, s, "receipt" if i == 0 else f"continuation {i}")
            for i, (part, s) in enumerate(zip(parts, signed, strict=True))
        ]
        statement = document["charge"]
        signature = base64.b64decode(document["charge_signature"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"not a receipt document: {exc}") from exc
    coordinators = {s.coordinator_id for s in signed}
    if len(coordinators) != 1:
        raise MalformedMessage(f"segments countersigned by several coordinators: {coordinators}")
    key = public_key_from_node_id(coordinators.pop())
    verify_signature(key, signature, _CHARGE_DOMAIN + canonical_json(statement))
    request_id = str(statement.get("request_id"))
    if document.get("request_id") != request_id:
        raise MalformedMessage("the document's request_id is not the one the charge was signed for")
    if document.get("amount_total") != statement.get("amount_total"):
        raise MalformedMessage("the document's amount_total is not the amount signed")
    if document.get("policy_sha256") != statement.get("policy_sha256"):
        raise MalformedMessage("the document's policy_sha256 is not the policy signed")
    entries = list(statement.get("segments") or ())
    signed_entries = [e for e in entries if e.get("signed")]
    if len(signed_entries) != len(signed) or any(
        entry != _signed_entry(int(entry.get("segment", -1)), s)
        for entry, s in zip(signed_entries, signed, strict=False)
    ):
        raise MalformedMessage("the receipts shown are not the segments the charge was signed for")
    if list(document.get("unsigned_segments") or ()) != [e for e in entries if not e.get("signed")]:
        raise MalformedMessage("the unsigned segments shown are not the ones the charge lists")
    for receipt in receipts:
        if receipt.request_id != request_id and not receipt.request_id.startswith(f"{request_id}~"):
            raise MalformedMessage(f"receipt {receipt.request_id} is not of request {request_id}")
    return Verified(request_id, int(statement["amount_total"]), receipts, statement)
