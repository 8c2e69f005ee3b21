"""Routing through the real gateway: workers of different prices and speeds on a real engine."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import SdkFactory
from tests.fleet import Fleet

pytestmark = pytest.mark.engine
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def ask(fleet: Fleet, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "tiny", "messages": HI, "max_tokens": 2, **body}
    return httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_sort_by_price_goes_to_the_cheapest_and_explains_why(fleet: Fleet) -> None:
    _name, key = fleet.client()
    response = ask(fleet, key, provider={"sort": "price"})
    assert response.status_code == 200, response.text
    cheap = fleet.members["cheap"].node_id
    assert response.headers["x-agora-worker"] == cheap
    assert response.headers["x-agora-route"].startswith("sort=price;considered=3")
    route = httpx.get(
        f"{fleet.coordinator.base_url}/routing/{response.json()['id']}",
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert route["decision"]["ranked"][0]["node_id"] == cheap
    assert [r["node_id"] for r in route["decision"]["ranked"]] == [
        fleet.members[n].node_id for n in ("cheap", "mid", "dear")
    ]
    assert route["attempts"] == [{"worker": cheap, "segment": 0, "outcome": "ok"}]


def test_max_price_excludes_dearer_workers(fleet: Fleet, sdk: SdkFactory) -> None:
    _name, key = fleet.client()
    # client prices include the 5 % fee: cheap 0.21, mid 0.315, dear 0.63 USD per 1M output
    response = ask(fleet, key, provider={"max_price": {"completion": 0.4}, "sort": "latency"})
    assert response.headers["x-agora-worker"] in {
        fleet.members["cheap"].node_id,
        fleet.members["mid"].node_id,
    }
    assert "over_max_price=1" in response.headers["x-agora-route"]
    client = sdk(fleet.coordinator.base_url, key)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=HI, max_tokens=2,
            extra_body={"provider": {"max_price": {"prompt": 0.01, "completion": 0.01}}},
        )  # fmt: skip
    assert info.value.code == "max_price_unmet"
    assert "max_price" in info.value.message


def test_ignore_and_order_are_obeyed(fleet: Fleet) -> None:
    _name, key = fleet.client()
    cheap, mid, dear = (fleet.members[n].node_id for n in ("cheap", "mid", "dear"))
    ignored = ask(fleet, key, provider={"sort": "price", "ignore": [cheap]})
    assert ignored.headers["x-agora-worker"] == mid
    ordered = ask(fleet, key, provider={"order": [dear[-10:]]})  # a suffix is enough
    assert ordered.headers["x-agora-worker"] == dear


def test_unknown_provider_preference_is_a_400(fleet: Fleet) -> None:
    _name, key = fleet.client()
    response = ask(fleet, key, provider={"sort": "price", "max_prize": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "provider.max_prize"


def test_default_routing_moves_traffic_away_from_a_slow_worker(fleet: Fleet) -> None:
    _name, key = fleet.client()
    cheap = fleet.members["cheap"]
    cheap.proxy.first_byte_delay_s = 1.5  # the cheapest worker turns slow
    try:
        served: Counter[str] = Counter()
        for _ in range(12):
            response = ask(fleet, key)
            assert response.status_code == 200
            served[response.headers["x-agora-worker"]] += 1
    finally:
        cheap.proxy.reset()
    assert served[cheap.node_id] <= 2, served
    view = fleet.worker_view(cheap.node_id)
    assert view is not None
    assert view["models"]["tiny"]["ttft_ewma_s"] > 0.5  # measured slow (healthy: ~0.02 s)
