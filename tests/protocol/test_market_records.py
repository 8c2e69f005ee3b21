"""The signed records of the p2p layer: what a reader accepts, and every forgery it refuses."""

from __future__ import annotations

import json

import pytest

from protocol.advert import Advert, ModelOffer, sign_registration
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.market import (
    Attestation,
    CoordinatorRecord,
    MarketUpdate,
    RelayedRegistration,
)

NOW = 1_800_000_000_000


def record(coordinator: Identity, expires_in_ms: int = 30_000) -> CoordinatorRecord:
    return CoordinatorRecord(coordinator.node_id, "127.0.0.1:1", "http://127.0.0.1:2/v1",
                             ("tiny",), NOW, NOW + expires_in_ms)  # fmt: skip


def registration(worker: Identity, node_id: str | None = None) -> RelayedRegistration:
    advert = Advert(node_id or worker.node_id, NOW, (ModelOffer("tiny", 4, 100, 200),))
    nonce = b"n" * 32
    data, signature = sign_registration(worker, nonce, advert)
    return RelayedRegistration(data, nonce, signature)


def test_a_coordinator_record_round_trips_and_expires() -> None:
    coordinator = Identity.generate()
    sealed = record(coordinator).seal(coordinator)
    assert CoordinatorRecord.open(sealed, NOW) == record(coordinator)
    with pytest.raises(ProtocolError, match="expired"):
        CoordinatorRecord.open(sealed, NOW + 30_000)


def test_a_record_signed_by_another_key_is_refused() -> None:
    coordinator, forger = Identity.generate(), Identity.generate()
    with pytest.raises(ProtocolError):
        record(coordinator).seal(forger)  # our own code refuses to sign it
    envelope = json.loads(record(forger).seal(forger))
    envelope["body"]["coordinator_id"] = coordinator.node_id  # claim to be the coordinator
    forged = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ProtocolError):
        CoordinatorRecord.open(forged, NOW)


def test_a_tampered_record_is_refused() -> None:
    coordinator = Identity.generate()
    envelope = json.loads(record(coordinator).seal(coordinator))
    envelope["body"]["grpc_target"] = "evil.example:50051"
    tampered = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ProtocolError):
        CoordinatorRecord.open(tampered, NOW)


def test_a_market_update_carries_verifiable_worker_registrations() -> None:
    coordinator, worker = Identity.generate(), Identity.generate()
    attestation = Attestation(worker.node_id, 3_000, 0)
    update = MarketUpdate(coordinator.node_id, 7, NOW, record(coordinator),
                          (registration(worker),), (attestation,))  # fmt: skip
    opened = MarketUpdate.open(update.seal(coordinator), NOW + 1_000, max_age_ms=60_000)
    assert opened == update
    assert opened.registrations[0].verify().node_id == worker.node_id
    with pytest.raises(ProtocolError, match="stale"):
        MarketUpdate.open(update.seal(coordinator), NOW + 61_000, max_age_ms=60_000)


def test_a_relayed_advert_a_worker_did_not_sign_is_refused() -> None:
    worker, forger = Identity.generate(), Identity.generate()
    forged = registration(forger, node_id=worker.node_id)  # names the worker, signed by forger
    with pytest.raises(ProtocolError):
        forged.verify()
    genuine = registration(worker)
    altered = RelayedRegistration(genuine.advert.replace(b'"tiny"', b'"big"'), genuine.nonce,
                                  genuine.signature)  # fmt: skip
    with pytest.raises(ProtocolError):
        altered.verify()


def test_an_update_with_a_forged_issuer_signature_is_refused() -> None:
    coordinator, forger = Identity.generate(), Identity.generate()
    honest = MarketUpdate(coordinator.node_id, 1, NOW, record(coordinator))
    envelope = json.loads(honest.seal(coordinator))
    envelope["signature"] = forger.sign(b"anything").hex()
    forged = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ProtocolError):
        MarketUpdate.open(forged, NOW, max_age_ms=60_000)
