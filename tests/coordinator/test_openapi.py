"""The OpenAPI document is the API: request bodies, the error statuses each route answers with
(in the OpenAI envelope), bearer security schemes instead of a header parameter, and no 422
(validation errors are 400 here)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from agora.stack import CoordinatorHandle


@pytest.fixture(scope="module")
def document(bare_coordinator: CoordinatorHandle) -> dict[str, Any]:
    base = bare_coordinator.base_url.removesuffix("/v1")
    response = httpx.get(f"{base}/openapi.json", timeout=30)
    response.raise_for_status()
    value: dict[str, Any] = response.json()
    return value


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path][method]
    return operation


@pytest.mark.parametrize(
    ("path", "body", "errors"),
    [
        ("/v1/chat/completions", "ChatCompletionBody", {"400", "401", "402", "404", "429", "503"}),
        ("/v1/completions", "CompletionBody", {"400", "401", "402", "404", "429", "503"}),
        ("/admin/v1/clients", "NewClient", {"400", "401", "403"}),
        ("/admin/v1/clients/{name}/credit", "Credit", {"400", "401", "403"}),
    ],
)
def test_bodies_and_error_statuses_are_documented(
    document: dict[str, Any], path: str, body: str, errors: set[str]
) -> None:
    operation = _operation(document, "post", path)
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": f"#/components/schemas/{body}"}
    assert errors <= set(operation["responses"])
    assert "422" not in operation["responses"]
    for status in errors:
        content = operation["responses"][status]["content"]["application/json"]["schema"]
        assert content == {"$ref": "#/components/schemas/ErrorEnvelope"}


def test_the_chat_body_schema_checks_what_the_api_checks(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionBody"]
    assert {"model", "messages"} <= set(chat["required"])
    role = schemas["Message"]["properties"]["role"]
    assert "wizard" not in role["enum"]
    assert "user" in role["enum"]
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2


def test_credentials_are_bearer_schemes_not_header_parameters(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "http", "scheme": "bearer"}
    assert schemes["AdminToken"]["scheme"] == "bearer"
    chat = _operation(document, "post", "/v1/chat/completions")
    assert chat["security"] == [{"ApiKey": []}]
    assert _operation(document, "get", "/admin/v1/workers")["security"] == [{"AdminToken": []}]
    for path_item in document["paths"].values():
        for operation in path_item.values():
            names = {p["name"].lower() for p in operation.get("parameters", [])}
            assert "authorization" not in names


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    refs = set(re.findall(r'"\$ref": "([^"]+)"', text))
    assert refs
    prefix = "#/components/schemas/"
    assert all(r.startswith(prefix) for r in refs), refs
    assert {r.removeprefix(prefix) for r in refs} <= set(document["components"]["schemas"])
