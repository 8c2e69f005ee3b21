"""The Files and Batch APIs refuse bad input with the OpenAI envelope and keep clients apart
(a real coordinator process, no workers: nothing here needs to run)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agora.stack import CoordinatorHandle, start_coordinator


@pytest.fixture
def http(bare_coordinator: CoordinatorHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bare_coordinator.base_url, timeout=30) as client:
        yield client


def client_key(coordinator: CoordinatorHandle) -> dict[str, str]:
    key = coordinator.create_client(f"files-{uuid.uuid4().hex[:8]}", 1_000_000)
    return {"Authorization": f"Bearer {key}"}


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()  # fmt: skip


def request(custom_id: str, url: str = "/v1/chat/completions", model: str = "m") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip


def upload(http: httpx.Client, auth: dict[str, str], data: bytes, purpose: str = "batch") -> Any:
    return http.post("/files", headers=auth, files={"file": ("in.jsonl", data)},
                     data={"purpose": purpose})  # fmt: skip


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_a_bad_batch_file_is_refused_whole_naming_each_bad_line(
    http: httpx.Client, bare_coordinator: CoordinatorHandle
) -> None:
    auth = client_key(bare_coordinator)
    bad = error(upload(http, auth, jsonl(request("a"), "{oops", request("a"))), 400)
    assert bad["code"] == "invalid_batch_file"
    assert "line 2: not valid JSON" in bad["message"]
    assert "line 3: `custom_id` 'a' is used twice" in bad["message"]
    assert error(upload(http, auth, jsonl(request("a")), purpose="fine-tune"), 400)["param"] == (
        "purpose"
    )
    assert error(http.post("/files", headers=auth, json={"purpose": "batch"}), 400)
    assert http.get("/files", headers=auth).json()["data"] == []  # nothing half-stored


def test_files_belong_to_the_client_that_uploaded_them(
    http: httpx.Client, bare_coordinator: CoordinatorHandle
) -> None:
    owner, other = client_key(bare_coordinator), client_key(bare_coordinator)
    data = jsonl(request("a"), request("b"))
    made = upload(http, owner, data)
    assert made.status_code == 200, made.text
    file = made.json()
    assert (file["object"], file["purpose"], file["bytes"]) == ("file", "batch", len(data))
    assert http.get(f"/files/{file['id']}/content", headers=owner).content == data
    for path in (f"/files/{file['id']}", f"/files/{file['id']}/content"):
        assert error(http.get(path, headers=other), 404)
    assert error(http.delete(f"/files/{file['id']}", headers=other), 404)
    assert [f["id"] for f in http.get("/files", headers=owner).json()["data"]] == [file["id"]]
    assert http.get("/files", headers=other).json()["data"] == []
    refused = http.post("/batches", headers=other, json={
        "input_file_id": file["id"], "endpoint": "/v1/chat/completions"})  # fmt: skip
    assert error(refused, 404)
    assert http.delete(f"/files/{file['id']}", headers=owner).json()["deleted"] is True
    assert error(http.get(f"/files/{file['id']}", headers=owner), 404)


@pytest.mark.parametrize(
    ("lines", "body", "param"),
    [
        ([request("a")], {"endpoint": "/v1/completions"}, "endpoint"),  # lines ask another
        ([request("a"), request("b", model="n")], {}, "input_file_id"),  # two models
        ([request("a")], {"completion_window": "1h"}, "completion_window"),
        ([request("a")], {"endpoint": "/v1/images"}, "endpoint"),
        ([request("a")], {"metadata": {"k": 1}}, "metadata.k"),
    ],
)
def test_a_batch_that_cannot_run_as_asked_is_refused(
    http: httpx.Client, bare_coordinator: CoordinatorHandle, lines: list[dict[str, Any]],
    body: dict[str, Any], param: str,
) -> None:  # fmt: skip
    auth = client_key(bare_coordinator)
    file_id = upload(http, auth, jsonl(*lines)).json()["id"]
    asked = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", **body}
    assert error(http.post("/batches", headers=auth, json=asked), 400)["param"] == param
    assert http.get("/batches", headers=auth).json()["data"] == []


def test_batches_are_listed_retrieved_and_cancelled_only_by_their_client(
    http: httpx.Client, bare_coordinator: CoordinatorHandle
) -> None:
    owner, other = client_key(bare_coordinator), client_key(bare_coordinator)
    file_id = upload(http, owner, jsonl(request("a"))).json()["id"]
    made = http.post("/batches", headers=owner, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions"})  # fmt: skip
    assert made.status_code == 200, made.text
    batch = made.json()
    assert (batch["object"], batch["status"], batch["request_counts"]["total"]) == (
        "batch", "in_progress", 1)  # fmt: skip
    assert error(http.get(f"/batches/{batch['id']}", headers=other), 404)
    assert error(http.post(f"/batches/{batch['id']}/cancel", headers=other), 404)
    assert http.get("/batches", headers=other).json()["data"] == []
    cancelled = http.post(f"/batches/{batch['id']}/cancel", headers=owner).json()
    assert cancelled["status"] in ("cancelling", "cancelled")
    assert [b["id"] for b in http.get("/batches", headers=owner).json()["data"]] == [batch["id"]]


def test_an_upload_over_the_limit_is_a_413(tmp_path: Any) -> None:
    coordinator = start_coordinator(tmp_path, env={"AGORA_COORDINATOR_FILES_MAX_BYTES": "1000"})
    try:
        auth = client_key(coordinator)
        with httpx.Client(base_url=coordinator.base_url, timeout=30) as http:
            data = jsonl(*(request(f"r{i}") for i in range(20)))
            assert len(data) > 1000
            error(upload(http, auth, data), 413)
    finally:
        coordinator.process.stop()
