"""The model list clients see (GET /v1/models): one card per served model, from the live pool,
and one per public model of the release catalogue (its versions and their shares)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.services.registry import Registry
from protocol.advert import EMBED


def model_cards(
    registry: Registry, fingerprint: Callable[[str], str | None],
    releases: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each model with its cheapest available price, capacity and pinned tokenizer digest."""
    out = []
    pools = registry.models()
    for release in releases or []:
        serving = [v for v in release["versions"] if v["share"] > 0]
        up = [s for v in serving for s in pools.get(v["serves"], []) if s.available]
        out.append(
            {
                "id": release["name"], "object": "model", "created": 0, "owned_by": "agora",
                "versions": [
                    {"id": v["ref"], "share": v["share"], "stable": v["stable"],
                     "state": v["state"]}
                    for v in release["versions"]
                ],
                "workers": len({s.node_id for s in up}),
                "available": bool(up),
                "available_slots": sum(s.free_slots for s in up),
            }
        )  # fmt: skip
    for name, pool in sorted(pools.items()):
        up = [s for s in pool if s.available]
        task = pool[0].offer.task
        cheapest = min(  # an embedding model's price is its input tokens' only
            up or pool,
            key=lambda s: (s.price_prompt_per_mtok,) if task == EMBED
            else (s.price_completion_per_mtok, s.price_prompt_per_mtok),
        )  # fmt: skip
        out.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "agora",
                "task": task,  # "generate": chat and completions; "embed": /v1/embeddings
                "context_length": max(s.offer.context_length for s in pool),
                "pricing": {
                    "prompt_per_mtok": cheapest.price_prompt_per_mtok,
                    "completion_per_mtok": cheapest.price_completion_per_mtok,
                    # the same worker's price of a prompt token found in its prefix cache
                    "cached_prompt_per_mtok": cheapest.price_cached_prompt_per_mtok,
                    "unit": "micro-USD per 1M tokens",
                },
                "workers": len(up),
                "available": bool(up),
                "available_slots": sum(s.free_slots for s in up),
                "tokenizer_sha256": fingerprint(name),
            }
        )
    return out
