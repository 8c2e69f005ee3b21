"""A client request and the jobs (attempts) the coordinator runs for it on workers."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import (
    CoordinatorError,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
)
from coordinator.services.registry import ModelSlot, WorkerConnection
from coordinator.services.routing import Preferences
from coordinator.services.settlement import JobFacts, SegmentRecord
from protocol.completions import CHAT, COMPLETIONS, Output
from protocol.proto import session_pb2 as pb
from protocol.receipt import SignedReceipt

ENDPOINT_PB = {CHAT: pb.ENDPOINT_CHAT_COMPLETIONS, COMPLETIONS: pb.ENDPOINT_COMPLETIONS}


@dataclass(frozen=True)
class CompletionRequest:
    endpoint: str  # CHAT or COMPLETIONS
    model: str
    body: dict[str, Any]  # the client's JSON, validated; unknown fields pass through
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prefs: Preferences = field(default_factory=Preferences)
    wants_token_ids: bool = False  # the client itself asked for return_token_ids

    @property
    def prompt(self) -> Any:
        return self.body.get("messages") if self.endpoint == CHAT else self.body.get("prompt")


def prompt_token_bound(request: CompletionRequest) -> int:
    """An upper bound of prompt tokens without a tokenizer: byte-level BPE never produces more
    tokens than bytes, and the JSON framing over-covers chat-template tokens."""
    return len(json.dumps(request.prompt, ensure_ascii=False).encode()) + 16


@dataclass(eq=False)
class Attempt:
    """One job on one worker: the first, a failover, or a continuation segment."""

    conn: WorkerConnection
    slot: ModelSlot
    facts: JobFacts
    events: asyncio.Queue[pb.JobEvent]
    endpoint: str  # what the worker runs (a continuation of a chat runs as a completion)
    segment: int
    dispatched_at: float = field(default_factory=time.monotonic)
    observed: Output = field(default_factory=Output)
    first_token_at: float | None = None
    last_token_at: float | None = None
    receipt: pb.SignedReceipt | None = None
    ended: bool = False
    first_event: pb.JobEvent | None = None  # taken off the queue while dispatching, not yet relayed

    @property
    def node_id(self) -> str:
        return self.conn.node_id

    def end(self, *, cancel: bool = False) -> None:
        """Give the worker slot back (idempotent); `cancel` tells the worker to stop."""
        if not self.ended:
            self.ended = True
            self.conn.close_job(self.facts.request_id, self.facts.model, cancel=cancel)

    def saw_tokens(self, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def latencies(self) -> tuple[float | None, float | None]:
        """(time to first token, mean inter-token latency) as the coordinator measured them."""
        if self.first_token_at is None:
            return None, None
        ttft = self.first_token_at - self.dispatched_at
        tokens = self.observed.tokens_delivered() or self.observed.completion_tokens or 0
        if (
            tokens > 1
            and self.last_token_at is not None
            and self.last_token_at > self.first_token_at
        ):
            return ttft, (self.last_token_at - self.first_token_at) / (tokens - 1)
        # a whole (non-streamed) response arrives at once: it says nothing about token pacing
        return ttft, None

    def record(self) -> SegmentRecord:
        receipt = None
        if self.receipt is not None:
            receipt = SignedReceipt(body=self.receipt.body, worker_signature=self.receipt.signature)
        return SegmentRecord(self.facts, self.observed, receipt)


def error_from_job(err: pb.JobError, retry_after_s: int | None = None) -> CoordinatorError:
    classes: dict[int, type[CoordinatorError]] = {
        400: InvalidRequest,
        404: ModelNotFound,
        413: PayloadTooLarge,
        422: InvalidRequest,
        429: RateLimited,
        503: NoCapacity,
        504: UpstreamTimeout,
    }
    exc = classes.get(err.http_status, UpstreamFailed)(err.message or "the worker failed")
    if isinstance(exc, NoCapacity | RateLimited):
        exc.retry_after_s = retry_after_s
    return exc


def error_chunk(exc: CoordinatorError) -> bytes:
    """The SSE convention for an error after the stream began: `data: {"error": …}`."""
    body = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    return json.dumps({"error": body}).encode()
