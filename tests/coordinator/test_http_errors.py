"""Bad input gets the OpenAI error envelope with the right status, and costs nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from agora.stack import CoordinatorHandle
from tests.conftest import SdkFactory


@pytest.fixture
def client(bare_coordinator: CoordinatorHandle) -> tuple[str, str]:
    name = f"errors-{uuid.uuid4().hex[:8]}"
    return name, bare_coordinator.create_client(name, 1_000_000)


@pytest.fixture
def client_key(client: tuple[str, str]) -> str:
    return client[1]


@pytest.fixture
def http(bare_coordinator: CoordinatorHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bare_coordinator.base_url, timeout=30) as client:
        yield client


def _assert_envelope(response: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, object] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def test_missing_key_is_401(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json={"model": "tiny", "messages": []})
    _assert_envelope(response, 401, "authentication_error")


def test_invalid_key_is_401(http: httpx.Client) -> None:
    response = http.get("/models", headers={"Authorization": "Bearer sk-agora-nope"})
    error = _assert_envelope(response, 401, "authentication_error")
    assert error["code"] == "invalid_api_key"


def test_malformed_json_is_400(http: httpx.Client, client_key: str) -> None:
    response = http.post(
        "/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"Authorization": f"Bearer {client_key}", "Content-Type": "application/json"},
    )
    _assert_envelope(response, 400, "invalid_request_error")


def test_missing_messages_is_400_naming_the_param(http: httpx.Client, client_key: str) -> None:
    response = http.post(
        "/chat/completions",
        json={"model": "tiny"},
        headers={"Authorization": f"Bearer {client_key}"},
    )
    error = _assert_envelope(response, 400, "invalid_request_error")
    assert error["param"] == "messages"


def test_unknown_model_is_404(
    bare_coordinator: CoordinatorHandle, client: tuple[str, str], sdk: SdkFactory
) -> None:
    name, key = client
    with pytest.raises(openai.NotFoundError) as info:
        sdk(bare_coordinator.base_url, key).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert bare_coordinator.balances()[f"client:{name}"] == 1_000_000


def test_oversized_body_is_413(http: httpx.Client, client_key: str) -> None:
    big = "x" * (5 * 1024 * 1024)
    response = http.post(
        "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": big}]},
        headers={"Authorization": f"Bearer {client_key}"},
    )
    _assert_envelope(response, 413, "invalid_request_error")


def test_unknown_route_is_404_in_the_envelope(http: httpx.Client) -> None:
    _assert_envelope(http.get("/no/such/route"), 404, "not_found_error")


def test_admin_api_needs_the_admin_token(
    bare_coordinator: CoordinatorHandle, http: httpx.Client
) -> None:
    base = bare_coordinator.base_url.removesuffix("/v1")
    response = httpx.get(f"{base}/admin/v1/balances", headers={"Authorization": "Bearer nope"})
    _assert_envelope(response, 403, "permission_error")
