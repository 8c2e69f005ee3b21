"""Policies on the request path in-process (workers played through the link seam, real
receipts, settlement on SQLite): what reaches the worker, what reaches the client, what is
billed and signed, and what the audit log keeps."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from coordinator.app import Coordinator
from coordinator.errors import InvalidRequest, NoCapacity
from coordinator.services.accounts import Principal
from coordinator.services.request_path import fulfilment as fulfilment_module
from coordinator.services.request_path.request import CompletionRequest
from coordinator.store import audit_store
from protocol.errors import MalformedMessage, ProtocolError
from protocol.receipt_document import verify_document
from tests.coordinator.test_request_path import (
    PlayedWorker,
    Script,
    chat,
    join,
    receipts,
    relay,
)

EMAIL, CARD = "jane.doe@example.com", "4111 1111 1111 1111"


async def client_with(coordinator: Coordinator, steps: list[dict[str, object]]) -> Principal:
    secret = coordinator.accounts.create_client("alice", credit=10**9)
    principal = await coordinator.accounts.authenticate(f"Bearer {secret}")
    coordinator.policies.save("strict", {"steps": steps})
    coordinator.policies.attach("strict", key_id=principal.key_id)
    return principal


def asking(text: str, stream: bool = True) -> CompletionRequest:
    request = chat(stream=stream)
    request.body["messages"] = [{"role": "user", "content": text}]
    return request


def worker_saw(worker: PlayedWorker) -> str:
    return str(msgspec.json.decode(worker.link.jobs[-1].body)["messages"])


@pytest.mark.parametrize("stream", [True, False])
async def test_placeholders_reach_the_worker_and_the_values_come_back(
    coordinator: Coordinator, stream: bool
) -> None:
    # the played model answers with the placeholder it was given
    worker = PlayedWorker("w", Script(tokens=["Sure, ", "[EMA", "IL_1]", " it is"]))
    join(coordinator, worker)
    principal = await client_with(coordinator, [{"kind": "pii", "mode": "placeholder"}])
    request = asking(f"Email {EMAIL} please, card {CARD}", stream)
    answer = await coordinator.request_path.begin(principal, request)
    if stream:
        text, usage, _raw = await relay(answer)
    else:
        whole = await answer.whole()
        text, usage = whole["choices"][0]["message"]["content"], whole["usage"]
    assert text == f"Sure, {EMAIL} it is"
    seen = worker_saw(worker)
    assert EMAIL not in seen
    assert CARD not in seen
    assert "[EMAIL_1]" in seen
    assert "[CARD_1]" in seen
    assert usage is not None
    assert usage["completion_tokens"] == 4
    await coordinator.request_path.drain()
    [stored] = receipts(coordinator)
    assert stored.policy_sha256 == coordinator.policies.describe()[0]["sha256"]
    document = coordinator.settlement.document(answer.request_id, "alice")
    assert document is not None
    assert verify_document(document).statement["policy_sha256"] == stored.policy_sha256
    with pytest.raises(MalformedMessage):  # the shown policy must be the one signed …
        verify_document({**document, "policy_sha256": "0" * 64})
    forged = {**document, "charge": {**document["charge"], "policy_sha256": "0" * 64}}
    with pytest.raises(ProtocolError):  # … and the signed one cannot be changed
        verify_document({**forged, "policy_sha256": "0" * 64})
    log = json.dumps(audit_store.latest(coordinator.db))
    assert EMAIL not in log
    assert CARD not in log
    assert "4111" not in log
    [event] = [e for e in audit_store.latest(coordinator.db) if e["action"] == "policy.hit"]
    hits = {(h["entity"], h["action"]) for h in event["detail"]["hits"]}
    assert hits == {("email", "placeholder"), ("card", "placeholder"),
                    ("placeholder", "restore")}  # fmt: skip


async def test_a_blocked_phrase_stops_the_stream_and_the_worker_is_paid_for_what_it_made(
    coordinator: Coordinator,
) -> None:
    tokens = ["The ", "sec", "ret pro", "ject ", "is ", "Atlas"]
    worker = PlayedWorker("w", Script(tokens=tokens))
    join(coordinator, worker)
    principal = await client_with(coordinator, [{"kind": "block", "phrases": ["secret project"]}])
    answer = await coordinator.request_path.begin(principal, asking("tell me"))
    text, usage, raw = await relay(answer)
    assert text == "The "
    assert b"sec" not in raw
    assert b'"finish_reason":"content_filter"' in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    assert worker.link.stopped == [answer.request_id]  # told to end the job and sign
    await coordinator.request_path.drain()
    [stored] = receipts(coordinator)  # the played worker went on to its end and signed it all
    assert stored.billed_completion_tokens == len(tokens)
    assert usage is not None
    assert usage["completion_tokens"] == len(tokens)


async def test_reject_mode_refuses_before_any_work_or_charge(coordinator: Coordinator) -> None:
    worker = PlayedWorker("w")
    join(coordinator, worker)
    principal = await client_with(coordinator, [{"kind": "pii", "mode": "reject"}])
    with pytest.raises(InvalidRequest) as refused:
        await coordinator.request_path.begin(principal, asking(f"my card is {CARD}"))
    assert refused.value.code == "policy_rejected"
    assert "strict@v1" in refused.value.message
    assert "card" in refused.value.message
    assert CARD not in refused.value.message
    assert worker.link.jobs == []
    await coordinator.request_path.drain()
    assert coordinator.accounts.balance("alice") == 10**9
    assert receipts(coordinator) == []


async def test_an_output_policy_refuses_what_would_show_the_raw_output(
    coordinator: Coordinator,
) -> None:
    join(coordinator, PlayedWorker("w"))
    principal = await client_with(coordinator, [{"kind": "block", "phrases": ["x y"]}])
    request = asking("hi")
    request.body["logprobs"] = True
    with pytest.raises(InvalidRequest) as refused:
        await coordinator.request_path.begin(principal, request)
    assert refused.value.code == "policy_conflict"


async def test_provider_constraints_leave_undeclared_workers_out(coordinator: Coordinator) -> None:
    join(coordinator, PlayedWorker("w"))  # declares nothing
    principal = await client_with(coordinator, [{"kind": "providers", "data_retention": ["none"]}])
    with pytest.raises(NoCapacity) as refused:
        await coordinator.request_path.begin(principal, asking("hi"))
    assert "policy_retention: 1" in refused.value.message


async def test_a_key_without_a_policy_is_untouched_and_a_key_policy_wins_over_its_clients(
    coordinator: Coordinator,
) -> None:
    worker = PlayedWorker("w")
    join(coordinator, worker)
    coordinator.policies.save("masking", {"steps": [{"kind": "pii", "mode": "mask"}]})
    coordinator.policies.save("none-here", {"steps": [{"kind": "flag", "phrases": ["zzz"]}]})
    secret = coordinator.accounts.create_client("bob", credit=10**9)
    other = coordinator.accounts.create_client("carol", credit=10**9)
    bob = await coordinator.accounts.authenticate(f"Bearer {secret}")
    carol = await coordinator.accounts.authenticate(f"Bearer {other}")
    coordinator.policies.attach("masking", client="bob")
    answer = await coordinator.request_path.begin(bob, asking(f"mail {EMAIL}"))
    await relay(answer)
    assert "[EMAIL]" in worker_saw(worker)
    answer = await coordinator.request_path.begin(carol, asking(f"mail {EMAIL}"))
    await relay(answer)
    assert EMAIL in worker_saw(worker)  # carol has no policy
    coordinator.policies.attach("none-here", key_id=bob.key_id)
    answer = await coordinator.request_path.begin(bob, asking(f"mail {EMAIL}"))
    await relay(answer)
    assert EMAIL in worker_saw(worker)  # the key's own policy (flags only) runs instead


async def test_a_node_that_ignores_the_stop_is_not_blamed_and_the_client_is_not_kept_waiting(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fulfilment_module, "STOP_GRACE_S", 0.05)
    coordinator.settings.idle_token_timeout_s = 30.0  # the grace, not this, must end it
    tokens = ["ok ", "then ", "bad", " word", " and", " more"]
    worker = PlayedWorker("old", Script(tokens=tokens, silent_stop=True))
    join(coordinator, worker)
    principal = await client_with(coordinator, [{"kind": "block", "phrases": ["bad word"]}])
    answer = await coordinator.request_path.begin(principal, asking("go"))
    async with asyncio.timeout(5):
        text, _usage, raw = await relay(answer)
    assert text == "ok then "
    assert raw.endswith(b"data: [DONE]\n\n")
    assert coordinator.stats.get(worker.node_id, "m").consecutive_failures == 0
    await coordinator.request_path.drain()
    assert coordinator.accounts.balance("alice") < 10**9  # what it delivered is still billed


@pytest.mark.parametrize("field", ["logprobs", "tools"])
async def test_output_policies_refuse_what_they_cannot_filter(
    coordinator: Coordinator, field: str
) -> None:
    join(coordinator, PlayedWorker("w"))
    principal = await client_with(coordinator, [{"kind": "pii", "mode": "placeholder"}])
    request = asking("hi")
    value = 0 if field == "logprobs" else [{"type": "function", "function": {"name": "f"}}]
    request.body[field] = value  # `logprobs: 0` still returns each token's text
    with pytest.raises(InvalidRequest) as refused:
        await coordinator.request_path.begin(principal, request)
    assert refused.value.code == "policy_conflict"


async def test_earlier_tool_call_arguments_are_redacted_too(coordinator: Coordinator) -> None:
    worker = PlayedWorker("w")
    join(coordinator, worker)
    principal = await client_with(coordinator, [{"kind": "pii", "mode": "mask"}])
    request = asking("and now?")
    call = {"id": "c1", "type": "function",
            "function": {"name": "send", "arguments": json.dumps({"to": EMAIL})}}  # fmt: skip
    request.body["messages"] = [
        {"role": "user", "content": "mail him"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": f"sent to {EMAIL}"},
    ]
    await relay(await coordinator.request_path.begin(principal, request))
    seen = worker_saw(worker)
    assert EMAIL not in seen
    assert seen.count("[EMAIL]") == 2
