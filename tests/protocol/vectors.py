"""Receipt test vectors: fixed key -> fixed canonical bytes -> fixed signature.

    python -m tests.protocol.vectors   # rewrite protocol/test_vectors/receipt_v1.json

Run it only when the receipt format changes on purpose (and bump RECEIPT_VERSION then); the test
suite checks the committed file, so any accidental change of bytes or signatures fails it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from protocol.identity import Identity
from protocol.receipt import Receipt, countersign, output_digest, prompt_digest, sign_receipt

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "test_vectors" / "receipt_v1.json"
WORKER_SEED = bytes(range(32))
COORDINATOR_SEED = bytes(range(32, 64))


def cases() -> list[Receipt]:
    worker = Identity.from_seed(WORKER_SEED)
    base = Receipt(
        request_id="0f8e7d6c5b4a39281706f5e4d3c2b1a0",
        model="tiny",
        worker_id=worker.node_id,
        coordinator_nonce="00112233445566778899aabbccddeeff",
        prompt_sha256=prompt_digest([{"role": "user", "content": "Hello"}]),
        output_sha256=output_digest(["Hi there"]),
        prompt_tokens=11,
        completion_tokens=3,
        price_prompt_per_mtok=100_000,
        price_completion_per_mtok=200_000,
        started_at_ms=1_795_420_468_000,
        ttft_ms=42,
        finished_at_ms=1_795_420_468_100,
        finish_reason="stop",
    )
    unicode = Receipt(
        **{
            **asdict(base),
            "request_id": "ffffffffffffffffffffffffffffffff",
            "model": "modèle-ü/日本",
            "prompt_sha256": prompt_digest("naïve café ☕"),
            "output_sha256": output_digest(["один", "二"]),
            "completion_tokens": 2**40,
            "finish_reason": "length",
        }
    )
    # a job run with a LoRA adapter: the one receipt form that carries `adapter_sha256`
    adapter = Receipt(
        **{**asdict(base), "adapter_sha256": "ab" * 32, "price_completion_per_mtok": 350_000}
    )
    # cached prompt tokens: the one form that carries them and the cached price they cost
    cached = Receipt(
        **{**asdict(base), "cached_prompt_tokens": 8, "price_cached_prompt_per_mtok": 25_000}
    )
    return [base, unicode, adapter, cached]


def build() -> dict[str, object]:
    worker = Identity.from_seed(WORKER_SEED)
    coordinator = Identity.from_seed(COORDINATOR_SEED)
    out = []
    for receipt in cases():
        signed = countersign(coordinator, sign_receipt(worker, receipt))
        out.append(
            {
                "fields": asdict(receipt),
                "canonical_utf8_hex": signed.body.hex(),
                "worker_signature_hex": signed.worker_signature.hex(),
                "coordinator_signature_hex": signed.coordinator_signature.hex(),
            }
        )
    return {
        "description": "Agora receipt v1: Ed25519 over 'agora-receipt-v1\\0' + canonical JSON; "
        "countersignature over 'agora-countersign-v1\\0' + sha256(body) + worker signature",
        "worker_seed_hex": WORKER_SEED.hex(),
        "worker_public_key_hex": worker.public_key.hex(),
        "worker_node_id": worker.node_id,
        "coordinator_seed_hex": COORDINATOR_SEED.hex(),
        "coordinator_node_id": coordinator.node_id,
        "vectors": out,
    }


if __name__ == "__main__":
    VECTORS.parent.mkdir(exist_ok=True)
    VECTORS.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {VECTORS}")
