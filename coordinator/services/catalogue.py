"""The model list clients see (GET /v1/models): one card per model, from the live pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.services.registry import Registry


def model_cards(
    registry: Registry, fingerprint: Callable[[str], str | None]
) -> list[dict[str, Any]]:
    """Each model with its cheapest available price, capacity and pinned tokenizer digest."""
    out = []
    for name, pool in sorted(registry.models().items()):
        up = [s for s in pool if s.available]
        cheapest = min(
            up or pool, key=lambda s: (s.price_completion_per_mtok, s.price_prompt_per_mtok)
        )
        out.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "agora",
                "context_length": max(s.offer.context_length for s in pool),
                "pricing": {
                    "prompt_per_mtok": cheapest.price_prompt_per_mtok,
                    "completion_per_mtok": cheapest.price_completion_per_mtok,
                    "unit": "micro-USD per 1M tokens",
                },
                "workers": len(up),
                "available": bool(up),
                "available_slots": sum(s.free_slots for s in up),
                "tokenizer_sha256": fingerprint(name),
            }
        )
    return out
