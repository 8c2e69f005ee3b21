"""What a worker offers: its models, prices and capacity, signed by its node key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from protocol.canonical import canonical_json, parse_canonical
from protocol.errors import MalformedMessage
from protocol.identity import Identity, public_key_from_node_id, verify_signature

PROTOCOL_VERSION = "agora.v2"  # v2: typed token frames replace JSON chunks
_REGISTER_DOMAIN = b"agora-register-v1\0"


@dataclass(frozen=True)
class ModelOffer:
    name: str  # the model name clients ask for
    max_concurrency: int  # jobs this node accepts at once for this model
    price_prompt_per_mtok: int  # micro-units per 1M prompt tokens
    price_completion_per_mtok: int  # micro-units per 1M completion tokens
    context_length: int = 0  # 0 when unknown
    dtype: str = ""  # e.g. "bfloat16"; "" when unknown
    quantization: str = ""  # e.g. "awq", "fp8"; "" = none
    lora_adapters: tuple[str, ...] = ()  # adapter names servable as models too
    engine: str = ""  # e.g. "vllm 0.24.0"

    def __post_init__(self) -> None:
        if not self.name:
            raise MalformedMessage("a model offer needs a name")
        if self.max_concurrency < 1:
            raise MalformedMessage("max_concurrency must be at least 1")
        if self.price_prompt_per_mtok < 0 or self.price_completion_per_mtok < 0:
            raise MalformedMessage("prices cannot be negative")


@dataclass(frozen=True)
class Advert:
    node_id: str
    issued_at_ms: int
    models: tuple[ModelOffer, ...]
    protocol_version: str = PROTOCOL_VERSION
    software: dict[str, str] = field(default_factory=dict)  # component -> version
    hardware: dict[str, str] = field(default_factory=dict)  # see worker_node.hardware

    def to_bytes(self) -> bytes:
        value = asdict(self)
        value["models"] = [asdict(m) for m in self.models]
        return canonical_json(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> Advert:
        value: dict[str, Any] = parse_canonical(data)
        try:
            models = tuple(
                ModelOffer(**{**m, "lora_adapters": tuple(m.get("lora_adapters", ()))})
                for m in value.pop("models")
            )
            return cls(models=models, **value)
        except (KeyError, TypeError) as exc:
            raise MalformedMessage(f"malformed advert: {exc}") from exc

    def offer(self, model: str) -> ModelOffer | None:
        return next((m for m in self.models if m.name == model), None)


def registration_message(nonce: bytes, advert_bytes: bytes) -> bytes:
    return _REGISTER_DOMAIN + nonce + advert_bytes


def sign_registration(identity: Identity, nonce: bytes, advert: Advert) -> tuple[bytes, bytes]:
    """Return (advert bytes, signature) proving possession of the key for this challenge."""
    data = advert.to_bytes()
    return data, identity.sign(registration_message(nonce, data))


def verify_registration(
    public_key: bytes, nonce: bytes, advert_bytes: bytes, signature: bytes
) -> Advert:
    """Raise InvalidSignature/MalformedMessage unless the advert is signed for this challenge by
    the key whose node id it names."""
    verify_signature(public_key, signature, registration_message(nonce, advert_bytes))
    advert = Advert.from_bytes(advert_bytes)
    if public_key_from_node_id(advert.node_id) != public_key:
        raise MalformedMessage("advert names a node id that is not the signer's")
    return advert
