"""What a worker offers: its models, prices and capacity, signed by its node key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from protocol.canonical import canonical_json, parse_canonical
from protocol.errors import MalformedMessage
from protocol.identity import Identity, public_key_from_node_id, verify_signature

PROTOCOL_VERSION = "agora.v2"  # v2: typed token frames replace JSON chunks
_REGISTER_DOMAIN = b"agora-register-v1\0"
GENERATE = "generate"
EMBED = "embed"
TASKS = (GENERATE, EMBED)
# what a node takes off its prices for a batch job (the Batch API, run on capacity online
# traffic leaves free) unless its operator says otherwise: OpenAI's half price
DEFAULT_BATCH_DISCOUNT_BPS = 5_000


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
    # registered adapters (by sha256) the node loads on demand: how many it holds at once
    # (0: none), and what a job with one costs (None: the base model's prices)
    max_loras: int = 0
    adapter_price_prompt_per_mtok: int | None = None
    adapter_price_completion_per_mtok: int | None = None
    # what a prompt token found in the engine's prefix cache costs (None: the prompt price)
    price_cached_prompt_per_mtok: int | None = None
    # what the model does: "generate" (chat and completions) or "embed" (/v1/embeddings,
    # priced per input token)
    task: str = GENERATE
    # basis points off every price for a batch job; None: the node signs no batch prices
    # (software from before them), so no batch job goes to it
    batch_discount_bps: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise MalformedMessage("a model offer needs a name")
        if self.max_concurrency < 1:
            raise MalformedMessage("max_concurrency must be at least 1")
        if self.price_prompt_per_mtok < 0 or self.price_completion_per_mtok < 0:
            raise MalformedMessage("prices cannot be negative")
        if self.max_loras < 0:
            raise MalformedMessage("max_loras cannot be negative")
        adapter_prices = (
            self.adapter_price_prompt_per_mtok,
            self.adapter_price_completion_per_mtok,
        )
        if any(p is not None and p < 0 for p in adapter_prices):
            raise MalformedMessage("prices cannot be negative")
        if self.batch_discount_bps is not None and not 0 <= self.batch_discount_bps <= 10_000:
            raise MalformedMessage("the batch discount must be between 0 and 10000 basis points")
        if self.task not in TASKS:
            raise MalformedMessage(f"unknown model task {self.task!r} (known: {', '.join(TASKS)})")
        cached = self.price_cached_prompt_per_mtok
        if cached is not None and not 0 <= cached <= self.price_prompt_per_mtok:
            raise MalformedMessage("the cached prompt price must be between 0 and the prompt price")

    def prices(self, adapter: str = "", batch: bool = False) -> tuple[int, int]:
        """(prompt, completion) per 1M tokens for a job, with a LoRA adapter or without, online
        or in a batch."""
        prompt, completion = (
            self.adapter_prices() if adapter
            else (self.price_prompt_per_mtok, self.price_completion_per_mtok)
        )  # fmt: skip
        return (self._batch(prompt), self._batch(completion)) if batch else (prompt, completion)

    def cached_price(self, adapter: str = "", batch: bool = False) -> int:
        """Per 1M prompt tokens found in the prefix cache: never above the job's prompt price."""
        prompt = self.prices(adapter)[0]
        cached = self.price_cached_prompt_per_mtok
        price = prompt if cached is None else min(cached, prompt)
        return self._batch(price) if batch else price

    @property
    def batch_discount(self) -> int:
        """Basis points off for a batch job (0 for a node that takes none)."""
        return self.batch_discount_bps or 0

    def _batch(self, price: int) -> int:
        return price * (10_000 - self.batch_discount) // 10_000

    def adapter_prices(self) -> tuple[int, int]:
        """What a job with any LoRA adapter costs: the adapter price, else the base price."""
        prompt = self.adapter_price_prompt_per_mtok
        completion = self.adapter_price_completion_per_mtok
        return (
            self.price_prompt_per_mtok if prompt is None else prompt,
            self.price_completion_per_mtok if completion is None else completion,
        )


@dataclass(frozen=True)
class Advert:
    node_id: str
    issued_at_ms: int
    models: tuple[ModelOffer, ...]
    protocol_version: str = PROTOCOL_VERSION
    software: dict[str, str] = field(default_factory=dict)  # component -> version
    hardware: dict[str, str] = field(default_factory=dict)  # see worker_node.hardware
    # declarations clients' policies can require: how long the node keeps prompts and outputs
    # ("none": not beyond the job; "": undeclared) and the region it runs in
    data_retention: str = ""
    region: str = ""

    def to_bytes(self) -> bytes:
        value = asdict(self)
        value["models"] = [_offer_fields(m) for m in self.models]
        for name in ("data_retention", "region"):  # only when declared: earlier adverts keep
            if not value[name]:  # the bytes every earlier coordinator reads
                del value[name]
        return canonical_json(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> Advert:
        value: dict[str, Any] = parse_canonical(data)
        try:
            models = tuple(
                ModelOffer(**{**m, "lora_adapters": tuple(m.get("lora_adapters", ()))})
                for m in value.pop("models")
            )
            # fields a later node declares that this software does not know are left out
            # (they are signed, so they stay in the bytes relayed on gossip)
            known = {f.name for f in fields(cls)}
            return cls(models=models, **{k: v for k, v in value.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise MalformedMessage(f"malformed advert: {exc}") from exc

    def offer(self, model: str) -> ModelOffer | None:
        return next((m for m in self.models if m.name == model), None)


_OPTIONAL_DEFAULTS = {
    "max_loras": 0,
    "adapter_price_prompt_per_mtok": None,
    "adapter_price_completion_per_mtok": None,
    "price_cached_prompt_per_mtok": None,
    "task": GENERATE,
    "batch_discount_bps": None,
}


def _offer_fields(offer: ModelOffer) -> dict[str, Any]:
    """An offer's signed fields; the LoRA, cached-price and task ones only when set, so offers
    without them keep the form every earlier coordinator reads."""
    value = asdict(offer)
    for name, default in _OPTIONAL_DEFAULTS.items():
        if value[name] == default:
            del value[name]
    return value


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
