"""A property of the whole HTTP surface, against a live coordinator on loopback: whatever JSON a
client sends to whichever route, the answer is never a 5xx but a 503 with Retry-After, every
error is the OpenAI envelope, and nothing is billed for a refused request."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agora.stack import CoordinatorHandle

FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream",
          "stream_options", "temperature", "top_p", "n", "seed", "stop", "logprobs",
          "top_logprobs", "provider", "return_token_ids", "tools", "echo", "logit_bias",
          "name", "credit", "amount", "rpm_limit", "idempotency_key")  # fmt: skip
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    | st.text(st.characters(blacklist_categories=()), max_size=4)  # lone surrogates too
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ("role", "content", "sort", "order", "include_usage", "max_price", "prompt", "x")
            )
            | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
valid_message = st.fixed_dictionaries({"role": st.sampled_from(("user", "system", "wizard")),
                                       "content": st.text(max_size=10)})  # fmt: skip
bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8),
    values | st.lists(valid_message, min_size=1, max_size=2) | st.sampled_from(("tiny", "")),
    max_size=8,
)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/admin/v1/clients",
          "/admin/v1/clients/{name}/credit", "/admin/v1/nodes/{name}/bond")  # fmt: skip
AUTHS = ("key", "admin", "none", "garbage")


@dataclass
class Surface:
    client: httpx.Client
    coordinator: CoordinatorHandle
    key: str
    name: str
    served: bool  # a worker serves "tiny" here: valid requests are answered and billed


@pytest.fixture(scope="module", params=["bare", pytest.param("market", marks=pytest.mark.engine)])
def surface(request: pytest.FixtureRequest) -> Iterator[Surface]:
    """A coordinator without workers (every route's refusals), and the session's market with
    a real engine (the request path itself: holds, routing, dispatch, settlement)."""
    if request.param == "bare":
        coordinator: CoordinatorHandle = request.getfixturevalue("bare_coordinator")
    else:
        coordinator = request.getfixturevalue("market").coordinator
    name = f"props-{uuid.uuid4().hex[:8]}"
    key = coordinator.create_client(name, 10**9)
    base = coordinator.base_url.removesuffix("/v1")
    with httpx.Client(base_url=base, timeout=120) as client:
        yield Surface(client, coordinator, key, name, request.param == "market")


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code == 503:
        assert response.headers.get("retry-after")
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(ROUTES), auth=st.sampled_from(AUTHS), body=bodies,
       raw=st.booleans())  # fmt: skip
def test_any_json_to_any_route_is_answered_without_a_5xx(
    surface: Surface, route: str, auth: str, body: dict[str, Any], raw: bool
) -> None:
    token = {"key": surface.key, "admin": surface.coordinator.admin_token, "none": None,
             "garbage": "%%% not-a-key"}[auth]  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if surface.served:  # what the engine is asked to generate stays small
        for bound in ("max_tokens", "max_completion_tokens", "n"):
            if isinstance(body.get(bound), int) and not isinstance(body[bound], bool):
                body[bound] = min(max(body[bound], 1), 2)
    before = surface.coordinator.balances()[f"client:{surface.name}"]
    path = route.format(name="nobody")
    if raw:  # the same body, truncated: not JSON at all
        content = httpx.Request("POST", "/", json=body).content[:-1]
        as_json = {**headers, "Content-Type": "application/json"}
        response = surface.client.post(path, content=content, headers=as_json)
    else:
        response = surface.client.post(path, json=body, headers=headers)
    _check(response)
    if route.startswith("/v1/") and response.status_code != 200:  # refused: nothing billed
        assert surface.coordinator.balances()[f"client:{surface.name}"] == before
    if not surface.served and route.startswith("/v1/"):
        assert response.status_code != 200  # no worker here: nothing can be served
