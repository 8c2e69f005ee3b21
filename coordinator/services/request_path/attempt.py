"""One job on one worker (an attempt of a request): the first, a failover, or a continuation
segment, with what the coordinator itself observed of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
from coordinator.services.registry import ModelSlot
from coordinator.services.request_path.link import JobStream
from coordinator.services.settlement import JobFacts, SegmentRecord
from protocol.completions import Output
from protocol.proto import session_pb2 as pb
from protocol.receipt import SignedReceipt


@dataclass(eq=False)
class Attempt:
    slot: ModelSlot
    facts: JobFacts
    events: JobStream
    endpoint: str  # what the worker runs (a continuation of a chat runs as a completion)
    segment: int
    continuation: bool = False  # it carries on a stream another worker began
    dispatched_at: float = field(default_factory=time.monotonic)
    observed: Output = field(default_factory=Output)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens_at_first: int = 0  # tokens in the first frames that carried any
    receipt: pb.SignedReceipt | None = None
    ended: bool = False

    @property
    def node_id(self) -> str:
        return self.slot.node_id

    def end(self, *, cancel: bool = False) -> None:
        """Give the worker slot back (idempotent); `cancel` tells the worker to stop."""
        if not self.ended:
            self.ended = True
            self.events.close(cancel=cancel)
            self.slot.conn.job_ended(self.facts.model)

    def saw_frames(self, frames: pb.Frames, now: float) -> None:
        self.observed.add_frames(frames)
        if frames.choices:
            if self.first_token_at is None:
                self.first_token_at = now
                self.tokens_at_first = self.observed.token_counts()[1]
            self.last_token_at = now

    def latencies(self) -> tuple[float | None, float | None]:
        """(time to first token, mean inter-token latency) as the coordinator measured them.

        The pace counts only the tokens that came after the first frames: those came with the
        first token, so a worker that holds back a long first chunk is not read as fast."""
        if self.first_token_at is None:
            return None, None
        ttft = self.first_token_at - self.dispatched_at
        later = self.observed.token_counts()[1] - self.tokens_at_first
        last = self.last_token_at
        if later > 0 and last is not None and last > self.first_token_at:
            return ttft, (last - self.first_token_at) / later
        # a whole (non-streamed) response arrives at once: it says nothing about token pacing
        return ttft, None

    def record(self) -> SegmentRecord:
        receipt = None
        if self.receipt is not None:
            receipt = SignedReceipt(body=self.receipt.body, worker_signature=self.receipt.signature)
        return SegmentRecord(self.facts, self.observed, receipt)


_ERRORS: dict[int, type[CoordinatorError]] = {
    400: InvalidRequest,
    404: ModelNotFound,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: NoCapacity,
    504: UpstreamTimeout,
}


def error_from_job(err: pb.JobError, retry_after_s: int | None = None) -> CoordinatorError:
    """A worker's error as the client's: an overloaded worker is 503 + Retry-After."""
    cls = NoCapacity if err.overloaded else _ERRORS.get(err.http_status, UpstreamFailed)
    exc = cls(err.message or f"the worker failed ({err.type or 'no detail'})")
    if isinstance(exc, NoCapacity | RateLimited):
        exc.retry_after_s = retry_after_s
    return exc
