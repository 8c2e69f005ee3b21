"""The exact response cache on a real vLLM engine, through the official openai SDK: a
deterministic request asked again with `X-Agora-Cache: on` is answered from the coordinator's
cache (no job reaches the worker), streamed with the miss's chunks or whole; it expires after
the TTL; one API key never gets another's answer; the hit's receipt says what it cost."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from protocol.cache_hit import verify_cache_hit
from tests.conftest import MODEL
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
TTL_S = 4.0
PRICE_BPS = 5_000  # a hit costs half of what the answer first cost
CACHE = {"X-Agora-Cache": "on"}


@dataclass
class Stage:
    coordinator: CoordinatorHandle
    worker: Process
    workdir: Path

    def client(self) -> tuple[str, openai.OpenAI]:
        name = f"cache-{time.monotonic_ns()}"
        key = self.coordinator.create_client(name, 10**10)
        return name, openai.OpenAI(base_url=self.coordinator.base_url, api_key=key,
                                   max_retries=0)  # fmt: skip

    def metric(self, name: str, *labels: str) -> int:
        """A counter of the coordinator's Prometheus metrics, summed over matching labels."""
        text = httpx.get(self.coordinator.base_url.removesuffix("/v1") + "/metrics").text
        return int(sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and all(label in line for label in labels)
        ))  # fmt: skip

    def jobs(self) -> int:
        """Requests a worker served (the coordinator's metrics)."""
        return self.metric("agora_requests_total", f'model="{MODEL}"', 'status="ok"')


@pytest.fixture(scope="module")
def stage(
    vllm_engine: VllmEngine, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stage]:
    workdir = tmp_path_factory.mktemp("response-cache")
    coordinator = start_coordinator(workdir, env={
        "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(tiny_model)}),
        "AGORA_COORDINATOR_RESPONSE_CACHE_TTL_S": str(TTL_S),
        "AGORA_COORDINATOR_RESPONSE_CACHE_PRICE_BPS": str(PRICE_BPS),
    })  # fmt: skip
    worker = start_worker(workdir, coordinator, WorkerSpec(
        name="cache-worker", served_model=MODEL, engine_url=vllm_engine.base_url))  # fmt: skip
    try:
        key = coordinator.create_client("readiness", 1)
        wait_for_workers(coordinator, key, MODEL, 1, [worker], timeout_s=120)
        yield Stage(coordinator, worker, workdir)
    finally:
        worker.stop()
        coordinator.process.stop()


def ask(sdk: openai.OpenAI, prompt: str, stream: bool, cache: bool = True) -> tuple[Any, Any]:
    """(headers, the answer: the parsed completion, or the list of stream chunks)."""
    params: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
        "temperature": 0, "extra_headers": CACHE if cache else {},
    }  # fmt: skip
    if stream:
        params["stream_options"] = {"include_usage": True}
    raw = sdk.chat.completions.with_raw_response.create(stream=stream, **params)
    parsed = raw.parse()
    return raw.headers, list(parsed) if stream else parsed


def shape(chunks: list[Any]) -> list[tuple[Any, ...]]:
    """What a client reads from a stream, chunk by chunk (ids and timestamps aside)."""
    out: list[tuple[Any, ...]] = []
    for c in chunks:
        if c.choices:
            d = c.choices[0]
            out.append((d.delta.role, d.delta.content, d.finish_reason))
        if c.usage:
            out.append(("usage", c.usage.prompt_tokens, c.usage.completion_tokens))
    return out


def test_a_repeated_deterministic_request_is_answered_from_the_cache(stage: Stage) -> None:
    _name, sdk = stage.client()
    prompt = f"The lighthouse keeper {time.monotonic_ns()} counted"
    headers, miss = ask(sdk, prompt, stream=True)
    assert headers["X-Agora-Cache"] == "miss"
    jobs = stage.jobs()
    headers, hit = ask(sdk, prompt, stream=True)
    assert headers["X-Agora-Cache"] == "hit"
    assert stage.jobs() == jobs  # no worker ran it
    assert stage.metric("agora_response_cache_total", 'result="hit"') >= 1
    assert shape(hit) == shape(miss)  # streamed identically
    assert hit[-1].usage.prompt_tokens_details.cached_tokens == hit[-1].usage.prompt_tokens
    assert hit[0].id != miss[0].id
    _headers, whole = ask(sdk, prompt, stream=False)  # the whole form of the same answer
    text = "".join(c.choices[0].delta.content or "" for c in miss if c.choices)
    assert whole.choices[0].message.content == text

    receipt = httpx.get(f"{stage.coordinator.base_url}/receipts/{hit[0].id}",
                        headers={"Authorization": f"Bearer {sdk.api_key}"}).json()  # fmt: skip
    statement = verify_cache_hit(receipt)
    assert statement["cache_hit"] is True
    assert statement["source_request_id"] == headers["X-Agora-Cache-Source"]
    assert statement["amount_total"] == int(headers["X-Agora-Charged"]) > 0


def test_a_cached_answer_expires_after_its_ttl(stage: Stage) -> None:
    _name, sdk = stage.client()
    prompt = f"The ferry left the harbour {time.monotonic_ns()} and"
    assert ask(sdk, prompt, stream=False)[0]["X-Agora-Cache"] == "miss"
    assert ask(sdk, prompt, stream=False)[0]["X-Agora-Cache"] == "hit"
    time.sleep(TTL_S + 0.5)
    assert ask(sdk, prompt, stream=False)[0]["X-Agora-Cache"] == "miss"


def test_answers_never_cross_api_keys_and_sampling_bypasses(stage: Stage) -> None:
    _a, alice = stage.client()
    _b, bob = stage.client()
    prompt = f"The miller's {time.monotonic_ns()} wheel"
    assert ask(alice, prompt, stream=False)[0]["X-Agora-Cache"] == "miss"
    assert ask(bob, prompt, stream=False)[0]["X-Agora-Cache"] == "miss"  # not alice's
    assert ask(bob, prompt, stream=False)[0]["X-Agora-Cache"] == "hit"
    assert "X-Agora-Cache" not in ask(bob, prompt, stream=False, cache=False)[0]
    sampled = alice.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4,
        temperature=0.9, extra_headers=CACHE,
    )  # fmt: skip
    assert sampled.headers["X-Agora-Cache"] == "bypass"
