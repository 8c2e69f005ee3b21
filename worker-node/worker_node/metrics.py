"""Live load read from the engine's own Prometheus metrics (vLLM exposes them at /metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # new name, old name


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    known: bool = False  # False when the engine exposes no vLLM metrics


def parse_vllm_metrics(text: str, model: str) -> EngineLoad:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_name", model) != model:
                continue
            if sample.name in (_RUNNING, _WAITING, *_KV_USAGE):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    if not values:
        return EngineLoad()
    kv = next((values[name] for name in _KV_USAGE if name in values), 0.0)
    return EngineLoad(
        running=int(values.get(_RUNNING, 0)),
        waiting=int(values.get(_WAITING, 0)),
        kv_cache_usage=min(1.0, max(0.0, kv)),
        known=True,
    )


async def read_engine_load(client: httpx.AsyncClient, base_url: str, model: str) -> EngineLoad:
    """Load of `model` from {server root}/metrics; an empty load if none is exposed."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    try:
        response = await client.get(f"{root}/metrics", timeout=5.0)
    except httpx.HTTPError:
        return EngineLoad()
    if response.status_code != 200:
        return EngineLoad()
    return parse_vllm_metrics(response.text, model)
