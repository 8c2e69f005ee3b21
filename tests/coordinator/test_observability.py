"""What an operator scrapes and reads: Prometheus metrics that move with the traffic, and JSON
log lines that carry the request id the client was given."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.fleet import Fleet

pytestmark = pytest.mark.engine


def scrape(fleet: Fleet) -> dict[str, float]:
    """Samples of the coordinator's /metrics, keyed by name{labels}."""
    text = httpx.get(fleet.coordinator.base_url.removesuffix("/v1") + "/metrics").text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str, *needles: str) -> float:
    return sum(
        v for k, v in samples.items() if k.startswith(prefix) and all(n in k for n in needles)
    )


def test_metrics_count_requests_tokens_latency_and_worker_state(fleet: Fleet) -> None:
    _name, key = fleet.client()
    before = scrape(fleet)
    response = httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
              "ignore_eos": True},
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    )  # fmt: skip
    assert response.status_code == 200
    after = scrape(fleet)
    ok = 'agora_requests_total{endpoint="chat",model="tiny",status="ok"}'
    assert after[ok] == before.get(ok, 0) + 1
    completion = 'agora_tokens_total{kind="completion",model="tiny"}'
    assert after[completion] == before.get(completion, 0) + 3
    assert total(after, "agora_ttft_seconds_count", 'model="tiny"') == (
        total(before, "agora_ttft_seconds_count", 'model="tiny"') + 1
    )
    assert total(after, "agora_routing_decisions_total", "dispatched") > total(
        before, "agora_routing_decisions_total", "dispatched"
    )
    served = response.headers["x-agora-worker"]
    assert after[f'agora_worker_available{{model="tiny",node="{served}"}}'] == 1
    assert f'agora_worker_score{{model="tiny",node="{served}"}}' in after
    assert after["agora_workers"] >= 3
    exposition = httpx.get(fleet.coordinator.base_url.removesuffix("/v1") + "/metrics").text
    for family in ("agora_worker_in_flight gauge", "agora_worker_kv_cache_usage gauge",
                   "agora_inter_token_latency_seconds histogram"):  # fmt: skip
        assert f"# TYPE {family}" in exposition


def test_json_log_lines_carry_the_request_id_of_the_response(fleet: Fleet) -> None:
    _name, key = fleet.client()
    response = httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    )  # fmt: skip
    request_id = response.headers["x-agora-request-id"]
    assert response.json()["id"].endswith(request_id)
    log = fleet.workdir / "coordinator.log"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == request_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    done = [line for line in mine if line["message"] == "request done"]
    assert len(done) == 1, mine
    assert done[0]["worker"] == response.headers["x-agora-worker"]
    assert done[0]["usage"]["completion_tokens"] == response.json()["usage"]["completion_tokens"]
    assert {"ts", "level", "logger"} <= set(done[0])
    error = httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions",
        json={"model": "no-such-model", "messages": []},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert error.headers["x-agora-request-id"]  # errors carry one too
