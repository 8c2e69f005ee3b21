from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from typing import Any

import pytest

from protocol.errors import InvalidSignature, MalformedMessage, ProtocolError
from protocol.identity import Identity
from protocol.receipt import (
    Receipt,
    SignedReceipt,
    countersign,
    sign_receipt,
    verify_receipt,
    verify_worker_signature,
)
from tests.protocol.vectors import COORDINATOR_SEED, VECTORS, WORKER_SEED, build, cases

WORKER = Identity.from_seed(WORKER_SEED)
COORDINATOR = Identity.from_seed(COORDINATOR_SEED)


def committed() -> dict[str, object]:
    data: dict[str, object] = json.loads(VECTORS.read_text())
    return data


def test_committed_vectors_match_a_fresh_computation() -> None:
    assert committed() == build()


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_vector_bytes_and_signatures_verify(index: int) -> None:
    data = committed()
    vector = data["vectors"][index]  # type: ignore[index]
    body = bytes.fromhex(vector["canonical_utf8_hex"])
    assert Receipt.from_bytes(body) == Receipt(**vector["fields"])
    signed = SignedReceipt(
        body=body,
        worker_signature=bytes.fromhex(vector["worker_signature_hex"]),
        coordinator_id=str(data["coordinator_node_id"]),
        coordinator_signature=bytes.fromhex(vector["coordinator_signature_hex"]),
    )
    assert verify_receipt(signed).worker_id == data["worker_node_id"]
    assert bytes.fromhex(str(data["worker_public_key_hex"])) == WORKER.public_key


def test_canonical_bytes_are_sorted_compact_utf8() -> None:
    receipt = cases()[1]
    text = receipt.to_bytes().decode()
    omitted = ("adapter_sha256", "cached_prompt_tokens", "price_cached_prompt_per_mtok")
    fields = {k: v for k, v in asdict(receipt).items() if k not in omitted}  # unused: omitted
    assert text == json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert "modèle-ü/日本" in text


def _signed() -> SignedReceipt:
    return countersign(COORDINATOR, sign_receipt(WORKER, cases()[0]))


def _with_every_field() -> SignedReceipt:
    """A receipt that carries the optional fields too (an adapter, cached tokens)."""
    receipt = replace(cases()[3], adapter_sha256="cd" * 32)
    return countersign(COORDINATOR, sign_receipt(WORKER, receipt))


# (a changed `version` is refused before any signature check: see the next test)
@pytest.mark.parametrize("field", [f.name for f in fields(Receipt) if f.name != "version"])
def test_tampering_with_any_field_breaks_the_worker_signature(field: str) -> None:
    signed = _with_every_field()
    original = signed.receipt
    value = getattr(original, field)
    changed: Any = value + 1 if isinstance(value, int) else value + "x"
    if field == "worker_id":
        changed = Identity.generate().node_id  # a valid id of someone else
    tampered = replace(original, **{field: changed})
    forged = replace(signed, body=tampered.to_bytes())
    with pytest.raises(InvalidSignature):
        verify_receipt(forged)


def test_unknown_version_is_refused() -> None:
    body = json.loads(_signed().body)
    body["version"] = 2
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(MalformedMessage, match="version"):
        Receipt.from_bytes(data)


def test_signature_by_a_different_key_fails() -> None:
    other = Identity.generate()
    body = cases()[0].to_bytes()
    forged = SignedReceipt(body=body, worker_signature=other.sign(b"agora-receipt-v1\0" + body))
    with pytest.raises(InvalidSignature):
        verify_worker_signature(forged)


def test_worker_cannot_sign_a_receipt_naming_another_worker() -> None:
    with pytest.raises(MalformedMessage):
        sign_receipt(Identity.generate(), cases()[0])


def test_countersignature_is_required_and_checked() -> None:
    signed = _signed()
    bare = SignedReceipt(body=signed.body, worker_signature=signed.worker_signature)
    with pytest.raises(MalformedMessage):
        verify_receipt(bare)
    assert verify_receipt(bare, require_countersignature=False) == signed.receipt
    bad = replace(signed, coordinator_signature=bytes(64))
    with pytest.raises(InvalidSignature):
        verify_receipt(bad)
    impostor = replace(signed, coordinator_id=Identity.generate().node_id)
    with pytest.raises(InvalidSignature):
        verify_receipt(impostor)


def test_json_document_round_trip() -> None:
    signed = _signed()
    assert SignedReceipt.from_json(json.loads(json.dumps(signed.to_json()))) == signed


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1, "b":2}',  # not compact
        b'{"b":1,"a":2}',  # not sorted
        b"[1,2]",  # not an object
        b"\xff",  # not UTF-8
    ],
)
def test_non_canonical_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Receipt.from_bytes(data)


def test_wrong_field_types_are_refused() -> None:
    body = json.loads(cases()[0].to_bytes())
    body["prompt_tokens"] = "11"
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(MalformedMessage, match="prompt_tokens"):
        Receipt.from_bytes(data)
