"""Sending one job to one worker: what the coordinator will hold the receipt to (JobFacts),
the job itself, and the wait for its first event. Shared by requests and spot checks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from billing.pricing import Price
from coordinator.services.registry import ModelSlot
from coordinator.services.request_path.attempt import Attempt
from coordinator.services.settlement import JobFacts
from protocol.completions import CHAT, EMBEDDINGS, prompt_of
from protocol.proto import session_pb2 as pb
from protocol.receipt import prompt_digest

ENDPOINT_PB = {CHAT: pb.ENDPOINT_CHAT_COMPLETIONS, EMBEDDINGS: pb.ENDPOINT_EMBEDDINGS}
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Quote:
    """A worker's price for a job and the advert that carries it."""

    price: Price
    advert_issued_at_ms: int

    @classmethod
    def of(cls, slot: ModelSlot, adapter: str = "", batch: bool = False) -> Quote:
        return cls(slot.worker_price(adapter, batch), slot.conn.advert.issued_at_ms)


class Dispatcher:
    def __init__(self, first_event_timeout_s: float) -> None:
        self._timeout_s = first_event_timeout_s  # a worker silent this long has failed

    def open(
        self,
        slot: ModelSlot,
        *,
        job_id: str,
        client: str,
        model: str,
        endpoint: str,
        body: dict[str, Any],
        segment: int = 0,
        continuation: bool = False,
        completion_bound: int | None = None,
        adapter: str = "",
        batch: bool = False,
        quote: Quote | None = None,
    ) -> Attempt:
        """Send a job to `slot`, priced at `quote` (taken when the client's hold was sized:
        the worker may have advertised again meanwhile, and still signs at the advert the job
        names) or, without one, at the slot's advert now."""
        quote = quote or Quote.of(slot, adapter, batch)
        prompt = prompt_of(endpoint, body)
        facts = JobFacts(
            request_id=job_id,
            client=client,
            worker_id=slot.node_id,
            model=model,
            nonce_hex=os.urandom(16).hex(),
            prompt_sha256=prompt_digest(prompt),
            price=quote.price,
            endpoint=endpoint,
            prompt=prompt,
            tools=body.get("tools"),
            max_completion_tokens=completion_bound,
            adapter_sha256=adapter,
        )
        job = pb.Job(
            request_id=job_id,
            model=model,
            endpoint=ENDPOINT_PB.get(endpoint, pb.ENDPOINT_COMPLETIONS),
            body=_encode(body),
            nonce=bytes.fromhex(facts.nonce_hex),
            deadline_ms=int((time.time() + self._timeout_s) * 1000),
            adapter_sha256=adapter,
            batch=batch,
            advert_issued_at_ms=quote.advert_issued_at_ms,  # the prices in `facts`
        )
        events = slot.conn.open_job(job)
        return Attempt(slot, facts, events, endpoint, segment, continuation)

    async def first_event(self, attempt: Attempt) -> pb.JobEvent:
        """The job's first event, or a retryable timeout error if the worker says nothing."""
        event = await attempt.events.next(self._timeout_s)
        if event is not None:
            return event
        error = pb.JobError(
            http_status=504, message=f"worker {attempt.node_id} sent nothing in time",
            type="timeout", retryable=True,
        )  # fmt: skip
        return pb.JobEvent(request_id=attempt.facts.request_id, error=error)
