"""Admission: per-key rate limits (429 + Retry-After), no capacity (503 + Retry-After) after a
bounded wait, the wait queue that serves a request once a slot frees, and revoked keys (401) —
each in the OpenAI error envelope, through the official SDK where it has a type for it."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import SdkFactory
from tests.fleet import Fleet

pytestmark = pytest.mark.engine
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def post(fleet: Fleet, key: str, model: str = "tiny", **body: Any) -> httpx.Response:
    return httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions",
        json={"model": model, "messages": HI, "max_tokens": 2, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    assert error["type"]
    if code is not None:
        assert error["code"] == code


def test_requests_per_minute_limit_is_429_with_retry_after(fleet: Fleet, sdk: SdkFactory) -> None:
    _name, key = fleet.client(rpm_limit=2)
    assert post(fleet, key).status_code == 200
    assert post(fleet, key).status_code == 200
    limited = post(fleet, key)
    assert_envelope(limited, 429, "rate_limit_exceeded")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert "requests per minute" in limited.json()["error"]["message"]
    client = sdk(fleet.coordinator.base_url, key).with_options(max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2)


def test_tokens_per_minute_limit_counts_what_was_used_not_what_was_feared(fleet: Fleet) -> None:
    # each request is admitted at its bound (~53 tokens) and refunded down to what it used
    _name, key = fleet.client(tpm_limit=120)
    for _ in range(5):  # without the refund the third would already be refused
        assert post(fleet, key).status_code == 200
    too_big = post(fleet, key, max_tokens=100)
    assert_envelope(too_big, 429, "tokens_exceed_limit")
    assert "max_tokens" in too_big.json()["error"]["message"]


def test_no_free_worker_is_503_with_retry_after_after_a_bounded_wait(fleet: Fleet) -> None:
    _name, key = fleet.client()
    solo = fleet.members["solo"]
    solo.proxy.first_byte_delay_s = 4.0  # holds the only slot
    seen = solo.proxy.requests
    holder = threading.Thread(target=post, args=(fleet, key, "tiny-solo"))
    holder.start()
    try:
        while solo.proxy.requests == seen:
            time.sleep(0.02)
        started = time.monotonic()
        busy = post(fleet, key, "tiny-solo")
        waited = time.monotonic() - started
    finally:
        holder.join()
        solo.proxy.reset()
    assert_envelope(busy, 503)
    assert int(busy.headers["retry-after"]) >= 1
    assert "at_capacity" in busy.json()["error"]["message"]
    assert waited >= 0.9  # it waited in the queue (1 s here) before giving up


def test_a_queued_request_is_served_when_the_slot_frees(fleet: Fleet) -> None:
    _name, key = fleet.client()
    solo = fleet.members["solo"]
    solo.proxy.first_byte_delay_s = 0.4  # shorter than the 1 s queue timeout
    seen = solo.proxy.requests
    results: list[httpx.Response] = []
    holder = threading.Thread(target=lambda: results.append(post(fleet, key, "tiny-solo")))
    holder.start()
    try:
        while solo.proxy.requests == seen:
            time.sleep(0.01)
        view = fleet.worker_view(solo.node_id)
        assert view is not None
        assert view["models"]["tiny-solo"]["in_flight"] == 1
        queued = post(fleet, key, "tiny-solo")
    finally:
        holder.join()
        solo.proxy.reset()
    assert results[0].status_code == 200
    assert queued.status_code == 200, queued.text
    assert queued.headers["x-agora-worker"] == solo.node_id
    assert solo.proxy.requests == seen + 2


def test_a_revoked_key_is_401_and_other_keys_still_work(fleet: Fleet) -> None:
    name, key = fleet.client()
    with fleet.coordinator.admin() as admin:
        second = admin.post(f"/clients/{name}/keys", json={}).json()["api_key"]
        keys = admin.get("/keys", params={"client": name}).json()["keys"]
        first_id = next(k["id"] for k in keys if key.startswith(k["prefix"]))
        assert admin.delete(f"/keys/{first_id}").status_code == 200
    assert_envelope(post(fleet, key), 401, "invalid_api_key")
    assert post(fleet, second).status_code == 200


def test_a_saturated_engine_is_back_pressure_never_a_failure(fleet: Fleet) -> None:
    """Three times as many streams as the model's nodes have slots, on one real engine: the
    overflow waits for a slot (freed slots wake it); what cannot get one in the bounded wait is
    told 503 with Retry-After, never a 500/502/504 or a broken stream, and a client that
    honours Retry-After (as the official SDK does) gets every answer in full. No worker's
    breaker opens: overload is not a failure."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.coordinator.conftest import C_WORKERS

    fleet.ready("tiny-c", len(C_WORKERS))
    slots = sum(
        (fleet.worker_view(fleet.members[n].node_id) or {})["models"]["tiny-c"]["max_concurrency"]
        for n in C_WORKERS
    )
    _name, key = fleet.client()
    told_to_wait: list[str] = []

    def one(i: int) -> tuple[int, int, str]:
        body = {"model": "tiny-c", "messages": [{"role": "user", "content": f"wave {i}"}],
                "max_tokens": 12, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        url = f"{fleet.coordinator.base_url}/chat/completions"
        headers = {"Authorization": f"Bearer {key}"}
        for _attempt in range(10):
            completion, error = 0, ""
            with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
                if response.status_code == 503:
                    response.read()
                    told_to_wait.append(response.headers.get("retry-after", ""))
                    time.sleep(float(response.headers.get("retry-after") or 1))
                    continue
                for line in response.iter_lines():
                    chunk = json.loads(line[6:]) if line.startswith("data: {") else {}
                    if chunk.get("usage"):
                        completion = chunk["usage"]["completion_tokens"]
                    error = error or str(chunk.get("error") or "")
                return response.status_code, completion, error
        return 503, 0, "still no capacity after 10 tries"

    with ThreadPoolExecutor(3 * slots) as pool:
        results = list(pool.map(one, range(3 * slots)))
    failed = [r for r in results if r[0] != 200 or r[1] != 12 or r[2]]
    assert not failed, failed
    assert all(wait.isdigit() for wait in told_to_wait), told_to_wait  # always a Retry-After
    for name in C_WORKERS:
        view = fleet.worker_view(fleet.members[name].node_id) or {}
        assert not view["models"]["tiny-c"]["cooldown_left_s"], name
