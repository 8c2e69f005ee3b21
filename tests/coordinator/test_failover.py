"""Failover before the first token: a worker that dies or fails is skipped, cooled down, and
the client is served by another, with every attempt in the routing record."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.coordinator.test_observability import scrape
from tests.fleet import Fleet

pytestmark = pytest.mark.engine
HI = [{"role": "user", "content": "hi"}]


def post(fleet: Fleet, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "tiny-c", "messages": HI, "max_tokens": 4, **body}
    return httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def routing(fleet: Fleet, key: str, request_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{fleet.coordinator.base_url}/routing/{request_id}",
        headers={"Authorization": f"Bearer {key}"},
    )
    response.raise_for_status()
    return dict(response.json())


def test_worker_killed_before_its_first_token_is_served_elsewhere(fleet: Fleet) -> None:
    fleet.ready("tiny-c", 3)
    _name, key = fleet.client()
    victim = fleet.members["c1"]
    victim.proxy.first_byte_delay_s = 30.0  # the job reaches the engine, then nothing comes
    seen_before = victim.proxy.requests
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: result.update(r=post(fleet, key, provider={"order": ["c1", victim.node_id]}))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while victim.proxy.requests == seen_before:  # the job is running on c1's engine
            assert time.monotonic() < deadline, "the job never reached c1"
            time.sleep(0.02)
        fleet.kill("c1")
        thread.join(timeout=60)
    finally:
        victim.proxy.reset()
        fleet.restart("c1")
    response = result["r"]
    assert response.status_code == 200, response.text
    served_by = response.headers["x-agora-worker"]
    assert served_by != victim.node_id
    assert response.json()["choices"][0]["message"]["content"]
    attempts = routing(fleet, key, response.json()["id"])["attempts"]
    assert [a["worker"] for a in attempts] == [victim.node_id, served_by]
    assert attempts[0]["outcome"] != "ok"
    assert attempts[1]["outcome"] == "ok"
    fleet.ready("tiny-c", 3)


def test_engine_failure_fails_over_and_cools_the_worker_down(fleet: Fleet) -> None:
    fleet.ready("tiny-c", 3)
    _name, key = fleet.client()
    victim = fleet.members["c2"]
    before = fleet.worker_view(victim.node_id)
    assert before is not None
    failovers = 'agora_failovers_total{model="tiny-c"}'
    counted = scrape(fleet).get(failovers, 0)
    victim.proxy.fail_status = 500
    try:
        response = post(fleet, key, provider={"order": [victim.node_id]})
        after = fleet.worker_view(victim.node_id)
    finally:
        victim.proxy.reset()
    assert response.status_code == 200, response.text
    assert response.headers["x-agora-worker"] != victim.node_id
    attempts = routing(fleet, key, response.json()["id"])["attempts"]
    assert attempts[0]["worker"] == victim.node_id
    assert attempts[0]["outcome"] != "ok"
    assert after is not None
    stats_before, stats_after = before["models"]["tiny-c"], after["models"]["tiny-c"]
    assert stats_after["cooldown_left_s"] > 0  # the breaker is open: routing skips it
    assert stats_after["failure_rate"] > stats_before["failure_rate"]
    assert scrape(fleet)[failovers] == counted + 1
    cooled = post(fleet, key, provider={"order": [victim.node_id]})
    assert cooled.headers["x-agora-worker"] != victim.node_id
    assert "cooling_down=1" in cooled.headers["x-agora-route"]


def test_without_fallbacks_a_failing_worker_is_the_clients_answer(fleet: Fleet) -> None:
    fleet.ready("tiny-c", 3)
    _name, key = fleet.client()
    victim = fleet.members["c3"]
    victim.proxy.fail_status = 500
    try:
        response = post(fleet, key, provider={"order": [victim.node_id], "allow_fallbacks": False})
    finally:
        victim.proxy.reset()
    assert response.status_code == 502
    assert response.json()["error"]["type"]
    assert victim.proxy.requests > 0


def test_a_request_the_engine_rejects_is_not_held_against_the_worker(fleet: Fleet) -> None:
    fleet.ready("tiny-c", 3)
    _name, key = fleet.client()
    c3 = fleet.members["c3"].node_id
    before = fleet.worker_view(c3)
    # longer than the engine's context: vLLM answers 400, which is the request's fault
    response = post(fleet, key, max_tokens=100_000, provider={"order": [c3]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    after = fleet.worker_view(c3)
    assert before is not None
    assert after is not None
    assert after["models"]["tiny-c"]["cooldown_left_s"] == 0
    assert after["models"]["tiny-c"]["failure_rate"] <= before["models"]["tiny-c"]["failure_rate"]
