"""Bad input gets the OpenAI error envelope with the right status, and costs nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from agora.stack import CoordinatorHandle, start_coordinator
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


CHAT_OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/chat/completions", {"max_tokens": True}, "max_tokens"),
        ("/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/chat/completions", {"stream": "yes"}, "stream"),
        ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0"),
        ("/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/chat/completions", {"temperature": "hot"}, "temperature"),
        ("/chat/completions", {"temperature": 2.5}, "temperature"),
        ("/chat/completions", {"top_p": 0}, "top_p"),
        ("/chat/completions", {"n": 0}, "n"),
        ("/chat/completions", {"seed": 1.5}, "seed"),
        ("/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/chat/completions", {"stream_options": {"include_usage": 1}}, "stream_options"),
        ("/completions", {"messages": None, "prompt": 5}, "prompt"),
        ("/completions", {"messages": None, "prompt": "hi", "logprobs": 99}, "logprobs"),
        ("/completions", {"messages": None, "prompt": "hi", "echo": "no"}, "echo"),
    ],
)  # fmt: skip
def test_a_malformed_request_is_400_naming_the_param_and_costs_nothing(
    bare_coordinator: CoordinatorHandle, http: httpx.Client, client: tuple[str, str],
    path: str, change: dict[str, object], param: str,
) -> None:  # fmt: skip
    """Types are not coerced ("yes" is not true), roles and ranges are checked, as OpenAI and
    vLLM do: the request is refused before routing, so nothing is held or billed."""
    name, key = client
    body = {k: v for k, v in {**CHAT_OK, **change}.items() if v is not None}
    response = http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    error = _assert_envelope(response, 400, "invalid_request_error")
    assert str(error["param"]).startswith(param), error
    assert bare_coordinator.balances()[f"client:{name}"] == 1_000_000


def test_request_headers_over_the_limit_are_431(http: httpx.Client, client_key: str) -> None:
    headers = {"Authorization": f"Bearer {client_key}", "X-Padding": "x" * (64 * 1024)}
    response = http.get("/models", headers=headers)
    error = _assert_envelope(response, 431, "invalid_request_error")
    assert error["code"] == "request_headers_too_large"
    assert response.headers["x-agora-request-id"]
    assert http.get("/models", headers={"Authorization": f"Bearer {client_key}"}).is_success


def test_admin_without_credentials_is_401_and_the_body_is_not_read_before_auth(
    bare_coordinator: CoordinatorHandle,
) -> None:
    base = bare_coordinator.base_url.removesuffix("/v1")
    with httpx.Client(base_url=f"{base}/admin/v1", timeout=30) as admin:
        _assert_envelope(admin.get("/balances"), 401, "authentication_error")
        garbled = b"{not json"
        json_type = {"Content-Type": "application/json"}
        _assert_envelope(admin.post("/clients", content=garbled, headers=json_type), 401,
                         "authentication_error")  # fmt: skip
        wrong = {**json_type, "Authorization": "Bearer nope"}
        _assert_envelope(admin.post("/clients", content=garbled, headers=wrong), 403,
                         "permission_error")  # fmt: skip
        token = {"Authorization": f"Bearer {bare_coordinator.admin_token}"}
        error = _assert_envelope(admin.post("/clients", content=garbled,
                                            headers={**json_type, **token}), 400,
                                 "invalid_request_error")  # fmt: skip
        assert "JSON" in str(error["message"])
        bad = admin.post("/clients", headers=token, json={"name": "x", "credit": -1})
        assert _assert_envelope(bad, 400, "invalid_request_error")["param"] == "credit"


def test_metrics_are_open_by_default_and_behind_a_token_when_one_is_set(
    bare_coordinator: CoordinatorHandle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = bare_coordinator.base_url.removesuffix("/v1")
    assert httpx.get(f"{base}/metrics", timeout=30).status_code == 200  # the default: open
    guarded = start_coordinator(tmp_path_factory.mktemp("metrics"),
                                env={"AGORA_COORDINATOR_METRICS_TOKEN": "scrape-me"})  # fmt: skip
    try:
        url = guarded.base_url.removesuffix("/v1") + "/metrics"
        _assert_envelope(httpx.get(url, timeout=30), 401, "authentication_error")
        wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=30)
        _assert_envelope(wrong, 401, "authentication_error")
        accented = {b"Authorization": b"Bearer \xc3\xa9t\xc3\xa9"}  # not ASCII: no 500
        not_ascii = httpx.get(url, headers=accented, timeout=30)
        _assert_envelope(not_ascii, 401, "authentication_error")
        right = httpx.get(url, headers={"Authorization": "Bearer scrape-me"}, timeout=30)
        assert right.status_code == 200
        assert "agora_" in right.text
    finally:
        guarded.process.stop()


def test_explicit_nulls_mean_the_defaults(http: httpx.Client, client_key: str) -> None:
    """OpenAI and vLLM read `null` as "not given": so does validation (the unknown model then
    answers, not a 400 on the flags)."""
    nulls = {"stream": None, "logprobs": None, "echo": None, "ignore_eos": None,
             "skip_special_tokens": None, "return_token_ids": None}  # fmt: skip
    for path, body in (("/chat/completions", CHAT_OK),
                       ("/completions", {"model": "tiny", "prompt": "hi"})):  # fmt: skip
        response = http.post(path, json={**body, **nulls},
                             headers={"Authorization": f"Bearer {client_key}"})  # fmt: skip
        error = _assert_envelope(response, 404, "invalid_request_error")
        assert error["code"] == "model_not_found"
