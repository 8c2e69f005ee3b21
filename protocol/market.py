"""Signed records coordinators exchange over libp2p: discovery and gossip only, never requests
or billing.

- `CoordinatorRecord`: "coordinator X serves models M; workers dial G; clients call U", put in
  the DHT under `record_key(X)` and signed by X's key (X is its node id = libp2p peer id).
- `DemandBoard`: a coordinator's demand board (requests, unmet demand, clearing prices and
  capacity per model), served at `GET /v1/market` and gossiped, signed by that coordinator.
- `MarketUpdate`: what a coordinator gossips: the registrations of the workers connected to it
  (each still carrying the worker's own signature over the coordinator's challenge, so a relay
  cannot forge or alter an advert) and its reputation attestations, the whole update signed by
  the issuing coordinator.

Every signed body is canonical JSON after a domain tag, so no signature can be replayed as
another kind of message. Readers refuse bad signatures, wrong signers and stale records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.advert import Advert, verify_registration
from protocol.canonical import canonical_json, parse_canonical
from protocol.errors import MalformedMessage, ProtocolError
from protocol.identity import Identity, public_key_from_node_id, verify_signature

_RECORD_DOMAIN = b"agora-coordinator-record-v1\0"
_UPDATE_DOMAIN = b"agora-market-update-v1\0"
_BOARD_DOMAIN = b"agora-demand-board-v1\0"
BOARD_PREFIX = b'{"body":{"board":'  # a sealed board's first bytes (canonical: keys sorted)
MAX_CLOCK_AHEAD_MS = 30_000  # a board dated further ahead than this is refused
RECORD_NAMESPACE = "agora"  # DHT keys are /agora/<coordinator id>
ANY_MODEL = "*"  # provider key every coordinator announces: "I take workers of any model"
MAX_MESSAGE_BYTES = 512 * 1024  # larger gossip/DHT payloads are refused unread


def record_key(coordinator_id: str) -> str:
    return f"/{RECORD_NAMESPACE}/{coordinator_id}"


def model_key(model: str) -> str:
    """The DHT provider key under which coordinators serving `model` announce themselves."""
    return f"agora-model:{model}"


def _seal(identity: Identity, domain: bytes, body: dict[str, Any]) -> bytes:
    signature = identity.sign(domain + canonical_json(body))
    return canonical_json({"body": body, "signature": signature.hex()})


def _open(data: bytes, domain: bytes, signer_field: str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"message of {len(data)} bytes is over the limit")
    envelope = parse_canonical(data)
    body = envelope.get("body")
    signature = envelope.get("signature")
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise MalformedMessage("expected {body, signature}")
    signer = body.get(signer_field)
    if not isinstance(signer, str):
        raise MalformedMessage(f"no {signer_field}")
    try:
        raw_signature = bytes.fromhex(signature)
    except ValueError as exc:
        raise MalformedMessage("signature is not hex") from exc
    verify_signature(public_key_from_node_id(signer), raw_signature, domain + canonical_json(body))
    return body


@dataclass(frozen=True)
class CoordinatorRecord:
    coordinator_id: str
    grpc_target: str  # host:port workers dial
    api_url: str  # the OpenAI-compatible base URL clients call
    models: tuple[str, ...]  # models it has workers for now
    issued_at_ms: int
    expires_at_ms: int  # re-announced before then; a dead coordinator's record lapses

    def seal(self, identity: Identity) -> bytes:
        if identity.node_id != self.coordinator_id:
            raise MalformedMessage("a coordinator record is signed by its own coordinator")
        body = {**self.__dict__, "models": list(self.models)}
        return _seal(identity, _RECORD_DOMAIN, body)

    @classmethod
    def open(cls, data: bytes, now_ms: int) -> CoordinatorRecord:
        """Verify and decode; raises ProtocolError if forged, malformed or expired."""
        body = _open(data, _RECORD_DOMAIN, "coordinator_id")
        try:
            record = cls(**{**body, "models": tuple(body["models"])})
        except (KeyError, TypeError) as exc:
            raise MalformedMessage(f"malformed coordinator record: {exc}") from exc
        if record.expires_at_ms <= now_ms:
            raise MalformedMessage("coordinator record expired")
        return record


def record_version(data: bytes) -> int:
    """When a sealed record was issued (unverified: for choosing the newest of several; the
    reader verifies the one it keeps)."""
    body = parse_canonical(data).get("body")
    issued = body.get("issued_at_ms") if isinstance(body, dict) else None
    if not isinstance(issued, int):
        raise MalformedMessage("no issued_at_ms")
    return issued


@dataclass(frozen=True)
class RelayedRegistration:
    """A worker's registration as its coordinator received it: anyone can check that the
    worker's key signed this advert (for that coordinator's challenge)."""

    advert: bytes
    nonce: bytes
    signature: bytes

    def verify(self) -> Advert:
        node_id = Advert.from_bytes(self.advert).node_id
        return verify_registration(
            public_key_from_node_id(node_id), self.nonce, self.advert, self.signature
        )

    def as_json(self) -> dict[str, str]:
        return {"advert": self.advert.decode(), "nonce": self.nonce.hex(),
                "signature": self.signature.hex()}  # fmt: skip

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RelayedRegistration:
        try:
            return cls(str(value["advert"]).encode(), bytes.fromhex(value["nonce"]),
                       bytes.fromhex(value["signature"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"malformed relayed registration: {exc}") from exc


@dataclass(frozen=True)
class Attestation:
    """The issuer's own evidence about a worker (decayed good/bad outcome weights, in
    thousandths: canonical JSON carries no floats). Never includes evidence it heard from
    others, so attestations do not echo around the network."""

    node_id: str
    good_milli: int
    bad_milli: int


@dataclass(frozen=True)
class MarketUpdate:
    issuer: str  # the coordinator that signed it
    seq: int  # increases with every update the issuer sends (older ones are ignored)
    issued_at_ms: int
    record: CoordinatorRecord
    registrations: tuple[RelayedRegistration, ...] = ()
    attestations: tuple[Attestation, ...] = ()

    def seal(self, identity: Identity) -> bytes:
        if identity.node_id != self.issuer or self.record.coordinator_id != self.issuer:
            raise MalformedMessage("a market update is signed by its own coordinator")
        body = {
            "issuer": self.issuer, "seq": self.seq, "issued_at_ms": self.issued_at_ms,
            "record": {**self.record.__dict__, "models": list(self.record.models)},
            "registrations": [r.as_json() for r in self.registrations],
            "attestations": [a.__dict__ for a in self.attestations],
        }  # fmt: skip
        return _seal(identity, _UPDATE_DOMAIN, body)

    @classmethod
    def open(cls, data: bytes, now_ms: int, max_age_ms: int) -> MarketUpdate:
        """Verify the issuer's signature and freshness (each registration is checked by the
        reader, so one bad advert does not hide the rest); raises ProtocolError."""
        body = _open(data, _UPDATE_DOMAIN, "issuer")
        try:
            raw = body["record"]
            record = CoordinatorRecord(**{**raw, "models": tuple(raw["models"])})
            update = cls(
                issuer=body["issuer"],
                seq=int(body["seq"]),
                issued_at_ms=int(body["issued_at_ms"]),
                record=record,
                registrations=tuple(RelayedRegistration.from_json(r)
                                    for r in body["registrations"]),
                attestations=tuple(Attestation(**a) for a in body["attestations"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"malformed market update: {exc}") from exc
        if record.coordinator_id != update.issuer:
            raise MalformedMessage("the update carries another coordinator's record")
        if abs(now_ms - update.issued_at_ms) > max_age_ms:
            raise MalformedMessage("market update is stale (or the issuer's clock is off)")
        return update


@dataclass(frozen=True)
class DemandBoard:
    """What one coordinator saw of demand and capacity (its `board`, plain JSON values),
    signed by it: readers believe only numbers its key signed, and only fresh ones."""

    coordinator_id: str
    issued_at_ms: int
    board: dict[str, Any]

    def seal(self, identity: Identity) -> bytes:
        if identity.node_id != self.coordinator_id:
            raise MalformedMessage("a demand board is signed by its own coordinator")
        body = {"board": self.board, "coordinator_id": self.coordinator_id,
                "issued_at_ms": self.issued_at_ms}  # fmt: skip
        return _seal(identity, _BOARD_DOMAIN, body)

    @classmethod
    def open(cls, data: bytes, now_ms: int, max_age_ms: int) -> DemandBoard:
        """Verify the signature and freshness; raises ProtocolError."""
        body = _open(data, _BOARD_DOMAIN, "coordinator_id")
        board, issued = body.get("board"), body.get("issued_at_ms")
        if not isinstance(board, dict) or not isinstance(issued, int):
            raise MalformedMessage("malformed demand board")
        if now_ms - issued > max_age_ms or issued - now_ms > MAX_CLOCK_AHEAD_MS:
            raise MalformedMessage("demand board is stale (or the issuer's clock is off)")
        return cls(str(body["coordinator_id"]), issued, board)


__all__ = [
    "ANY_MODEL",
    "Attestation",
    "CoordinatorRecord",
    "DemandBoard",
    "MarketUpdate",
    "ProtocolError",
    "RelayedRegistration",
    "model_key",
    "record_key",
    "record_version",
]
