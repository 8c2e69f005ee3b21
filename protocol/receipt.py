"""The signed receipt: the billing record of one job.

The worker signs it; the coordinator checks it against what it relayed, countersigns it and
stores it; the client can fetch both signatures and verify them offline. Money fields are
integers (micro-units of the account currency per 1M tokens), never floats.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from protocol.canonical import canonical_json, parse_canonical, stable_digest
from protocol.errors import MalformedMessage
from protocol.identity import Identity, public_key_from_node_id, verify_signature

RECEIPT_VERSION = 1
_WORKER_DOMAIN = b"agora-receipt-v1\0"
_COORDINATOR_DOMAIN = b"agora-countersign-v1\0"
_BILLED_DOMAIN = b"agora-countersign-v2\0"  # the countersignature also covers what was billed


@dataclass(frozen=True)
class Receipt:
    request_id: str
    model: str
    worker_id: str
    coordinator_nonce: str  # hex of the nonce the coordinator put in the job
    prompt_sha256: str
    output_sha256: str
    prompt_tokens: int
    completion_tokens: int
    price_prompt_per_mtok: int  # micro-units per 1M prompt tokens
    price_completion_per_mtok: int  # micro-units per 1M completion tokens
    started_at_ms: int  # unix ms when the worker began the job
    ttft_ms: int  # time to the first token, as the worker saw it
    finished_at_ms: int
    finish_reason: str
    version: int = RECEIPT_VERSION
    # SHA-256 of the LoRA adapter the job ran with; "" (and absent from the signed bytes, so
    # receipts of base-model jobs keep their form) when it ran the base model
    adapter_sha256: str = ""
    # prompt tokens the engine found in its prefix cache, billed at the cached price the node
    # advertises (<= its prompt price); both absent from the signed bytes when none were
    cached_prompt_tokens: int = 0
    price_cached_prompt_per_mtok: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.cached_prompt_tokens <= self.prompt_tokens:
            raise MalformedMessage("cached_prompt_tokens must be between 0 and prompt_tokens")
        if not 0 <= self.price_cached_prompt_per_mtok <= self.price_prompt_per_mtok:
            raise MalformedMessage("the cached prompt price must be between 0 and the prompt price")
        if self.price_cached_prompt_per_mtok and not self.cached_prompt_tokens:
            raise MalformedMessage("a cached prompt price without cached prompt tokens")

    def to_bytes(self) -> bytes:
        value = asdict(self)
        for name, default in _OPTIONAL.items():
            if value[name] == default:
                del value[name]
        if not self.cached_prompt_tokens:  # the price of no tokens is not part of the claim
            del value["price_cached_prompt_per_mtok"]
        return canonical_json(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        value = parse_canonical(data)
        expected = {f.name for f in fields(cls)}
        for name, default in _OPTIONAL.items():
            if name in value and value[name] == default:
                raise MalformedMessage(f"receipt field {name} is present but {default!r}")
        if ("cached_prompt_tokens" in value) != ("price_cached_prompt_per_mtok" in value):
            raise MalformedMessage("cached_prompt_tokens and its price come together")
        for name, default in _OPTIONAL.items():
            value.setdefault(name, default)
        value.setdefault("price_cached_prompt_per_mtok", 0)
        if set(value) != expected:
            missing, extra = expected - set(value), set(value) - expected
            raise MalformedMessage(f"receipt fields differ: missing {missing}, extra {extra}")
        for f in fields(cls):
            want = int if f.type in ("int", int) else str
            if type(value[f.name]) is not want:
                raise MalformedMessage(f"receipt field {f.name} must be {want.__name__}")
        receipt = cls(**value)
        if receipt.version != RECEIPT_VERSION:
            raise MalformedMessage(f"unsupported receipt version {receipt.version}")
        return receipt


# fields left out of the signed bytes at their default, so receipts that do not use them keep
# the form every earlier verifier reads
_OPTIONAL: dict[str, object] = {"adapter_sha256": "", "cached_prompt_tokens": 0}


def billed_cached_tokens(receipt: Receipt, billed_prompt_tokens: int) -> int:
    """The cached prompt tokens billed at the cached price: the worker's claim, never more than
    the prompt tokens billed (a claim can only lower the worker's own pay, see README)."""
    return min(receipt.cached_prompt_tokens, billed_prompt_tokens)


@dataclass(frozen=True)
class SignedReceipt:
    """Receipt bytes exactly as signed, the worker's signature, and optionally the
    coordinator's countersignature over both (and over the token counts the client was
    billed, min(claim, the coordinator's recount), when it gives them)."""

    body: bytes
    worker_signature: bytes
    coordinator_id: str = ""
    coordinator_signature: bytes = b""
    billed: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens)

    @property
    def receipt(self) -> Receipt:
        return Receipt.from_bytes(self.body)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "receipt": parse_canonical(self.body),
            "body_b64": base64.b64encode(self.body).decode(),
            "worker_signature": base64.b64encode(self.worker_signature).decode(),
            "coordinator_id": self.coordinator_id,
            "coordinator_signature": base64.b64encode(self.coordinator_signature).decode(),
        }
        if self.billed is not None:
            out["billed"] = {"prompt_tokens": self.billed[0], "completion_tokens": self.billed[1]}
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SignedReceipt:
        try:
            billed = value.get("billed")
            return cls(
                billed=(int(billed["prompt_tokens"]), int(billed["completion_tokens"]))
                if billed is not None
                else None,
                body=base64.b64decode(value["body_b64"], validate=True),
                worker_signature=base64.b64decode(value["worker_signature"], validate=True),
                coordinator_id=str(value.get("coordinator_id", "")),
                coordinator_signature=base64.b64decode(
                    value.get("coordinator_signature", ""), validate=True
                ),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedMessage(f"not a signed receipt document: {exc}") from exc


def sign_receipt(identity: Identity, receipt: Receipt) -> SignedReceipt:
    if receipt.worker_id != identity.node_id:
        raise MalformedMessage("a receipt must name the worker that signs it")
    body = receipt.to_bytes()
    return SignedReceipt(body=body, worker_signature=identity.sign(_WORKER_DOMAIN + body))


def verify_worker_signature(signed: SignedReceipt) -> Receipt:
    """Check the worker's signature against the key inside its node id; return the receipt."""
    receipt = signed.receipt
    key = public_key_from_node_id(receipt.worker_id)
    verify_signature(key, signed.worker_signature, _WORKER_DOMAIN + signed.body)
    return receipt


def _countersign_message(signed: SignedReceipt) -> bytes:
    head = hashlib.sha256(signed.body).digest() + signed.worker_signature
    if signed.billed is None:
        return _COORDINATOR_DOMAIN + head
    prompt, completion = signed.billed
    billed = canonical_json({"prompt_tokens": prompt, "completion_tokens": completion})
    return _BILLED_DOMAIN + head + billed


def countersign(
    identity: Identity, signed: SignedReceipt, billed: tuple[int, int] | None = None
) -> SignedReceipt:
    """The coordinator's signature over a receipt it has already verified (the caller checks
    the worker's signature first: verifying costs more than signing, so it is done once)."""
    out = SignedReceipt(signed.body, signed.worker_signature, identity.node_id, b"", billed)
    return dataclasses.replace(out, coordinator_signature=identity.sign(_countersign_message(out)))


def verify_receipt(signed: SignedReceipt, *, require_countersignature: bool = True) -> Receipt:
    """Verify every signature on a receipt document; raise InvalidSignature on any failure."""
    receipt = verify_worker_signature(signed)
    if require_countersignature or signed.coordinator_signature:
        if not signed.coordinator_id:
            raise MalformedMessage("receipt has no coordinator countersignature")
        key = public_key_from_node_id(signed.coordinator_id)
        verify_signature(key, signed.coordinator_signature, _countersign_message(signed))
    return receipt


def prompt_digest(prompt: Any) -> str:
    """Hash of the prompt part of a request (chat `messages` or completion `prompt`)."""
    return stable_digest(prompt)


def output_digest(texts: list[str]) -> str:
    """Hash of the generated text of each choice, in choice-index order."""
    return stable_digest(list(texts))
