"""A finished stream gives its worker slot back before the client sees the end of it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from billing.pricing import Price
from coordinator.api.sse import EventStreamResponse
from coordinator.config import CoordinatorSettings
from coordinator.services.accounts import Accounts, Principal
from coordinator.services.admission import Limits
from coordinator.services.decisions import RouteRecord
from coordinator.services.gateway import Gateway
from coordinator.services.jobs import Attempt, CompletionRequest
from coordinator.services.registry import Registry, WorkerConnection
from coordinator.services.relay import Completion
from coordinator.services.routing import Decision
from coordinator.services.settlement import JobFacts, Settlement
from coordinator.store.db import make_engine, migrate
from coordinator.store.writer import LedgerWriter
from protocol.advert import Advert, ModelOffer
from protocol.completions import CHAT
from protocol.identity import Identity
from protocol.proto import session_pb2 as pb


async def test_event_stream_response_runs_the_generators_cleanup_before_returning() -> None:
    cleaned: list[bool] = []

    async def events() -> AsyncGenerator[tuple[bytes, bool]]:
        try:
            yield b"data: a\n\n", False
            yield b"data: [DONE]\n\n", True
            yield b"never sent", False
        finally:
            cleaned.append(True)

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await EventStreamResponse(events(), headers={}).stream_response(send)
    assert cleaned == [True]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True, False]  # end + terminator in one write
    assert b"never sent" not in b"".join(m["body"] for m in bodies)


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    db = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(db)
    settings = CoordinatorSettings(data_dir=tmp_path)
    settlement = Settlement(db, LedgerWriter(db), Identity.generate(), settings.fee_bps)
    return Gateway(Registry(), Accounts(db), settlement, settings)


async def test_the_slot_is_free_when_the_final_batch_is_handed_out(gateway: Gateway) -> None:
    worker = Identity.generate()
    gateway.registry.add(
        WorkerConnection(worker.node_id, Advert(worker.node_id, 0, (ModelOffer("m", 1, 1, 1),)))
    )
    slot = gateway.registry.pool("m")[0]
    request = CompletionRequest(CHAT, "m", {"messages": []}, True, False, 4)
    events = slot.conn.open_job(pb.Job(request_id="r1", model="m"))
    assert slot.free_slots == 0
    chunk = b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}'
    first = pb.JobEvent(request_id="r1", chunks=pb.ChunkBatch(chunks=[chunk]))
    events.put_nowait(pb.JobEvent(request_id="r1", receipt=pb.SignedReceipt(body=b"{}")))
    facts = JobFacts("r1", "c", worker.node_id, "m", "00", "p", Price(1, 1))
    attempt = Attempt(slot.conn, slot, facts, events, CHAT, 0)
    record = RouteRecord("r1", "c", "m", Decision((), 1, 1))
    principal = Principal("c", 1, Limits())
    completion = Completion(gateway, principal, request, attempt, first, record, 4)
    seen_free_at_end = None
    async for _batch, last in completion.stream():
        if last:
            seen_free_at_end = slot.free_slots
    assert seen_free_at_end == 1
