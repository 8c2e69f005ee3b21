"""Relaying one request's output to the client, across workers if one fails mid-stream.

Errors after the first token follow the SSE convention of a final `{"error": …}` chunk, unless
a continuation on another worker can carry the stream on (see services.continuation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from coordinator.errors import CoordinatorError, UpstreamFailed, UpstreamTimeout
from coordinator.services.accounts import Principal
from coordinator.services.continuation import as_chat_chunk
from coordinator.services.decisions import RouteRecord
from coordinator.services.jobs import Attempt, CompletionRequest, error_chunk, error_from_job
from coordinator.services.reservations import Hold
from coordinator.services.settlement import Settled
from protocol.completions import CHAT, Output
from protocol.proto import session_pb2 as pb

log = logging.getLogger("agora.coordinator.relay")
_TOKEN_ID_KEYS = ("token_ids", "prompt_token_ids")


class Dispatcher(Protocol):
    """What a relay needs from the gateway."""

    @property
    def idle_timeout_s(self) -> float: ...

    async def continue_elsewhere(self, completion: Completion) -> Attempt | None:
        """A new attempt that generates the rest of the stream, or None if there is none."""
        ...

    def attempt_finished(self, attempt: Attempt, *, ok: bool) -> None: ...

    async def settle(self, completion: Completion) -> Settled | None: ...

    def settle_later(self, completion: Completion) -> None:
        """Settle without the caller waiting (the client is gone)."""
        ...

    def request_finished(self, completion: Completion, status: str) -> None: ...


class _Stalled(Exception):
    pass


class Completion:
    """A dispatched request whose first worker event has arrived."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        principal: Principal,
        request: CompletionRequest,
        attempt: Attempt,
        first: pb.JobEvent,
        route: RouteRecord,
        max_tokens: int | None,
    ) -> None:
        self._dispatcher = dispatcher
        self.principal = principal
        self.request = request
        self.attempts = [attempt]
        self._pending: pb.JobEvent | None = first
        self.route = route
        self.max_tokens = max_tokens  # the bound the first job ran with
        self.admitted_tokens = 0  # tokens held against the key's per-minute limit
        self.hold: Hold | None = None  # credit reserved for it until it is settled
        self.request_id = route.request_id
        prefix = "chatcmpl" if request.endpoint == CHAT else "cmpl"
        self.response_id = f"{prefix}-{self.request_id}"
        self.created = int(time.time())
        self.delivered = Output()  # what the client got, in its own endpoint's shape
        self.settled: Settled | None = None
        self._done = False

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    @property
    def worker_id(self) -> str:
        return self.attempts[0].node_id

    async def _next_event(self) -> pb.JobEvent:
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        try:
            return await asyncio.wait_for(
                self.current.events.get(), timeout=self._dispatcher.idle_timeout_s
            )
        except TimeoutError:
            raise _Stalled from None

    # ---------------------------------------------------------------- chunks
    def _relay_chunk(self, raw: bytes) -> bytes | None:
        attempt = self.current
        chunk: dict[str, Any] = json.loads(raw)
        attempt.observed.add(attempt.endpoint, chunk, streamed=True)
        choices = chunk.get("choices")
        if not choices:
            return None  # the usage-only chunk: the client gets one usage chunk, made at the end
        attempt.saw_tokens(time.monotonic())
        if attempt.endpoint != self.request.endpoint:
            chunk = as_chat_chunk(chunk)
        chunk["id"] = self.response_id
        chunk["model"] = self.request.model
        chunk["created"] = self.created
        chunk.pop("usage", None)
        self.delivered.add(self.request.endpoint, chunk, streamed=True)
        if not self.request.wants_token_ids:
            chunk.pop("prompt_token_ids", None)
            for choice in chunk["choices"]:
                for key in _TOKEN_ID_KEYS:
                    choice.pop(key, None)
        return json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()

    def usage(self) -> dict[str, int]:
        """The client's usage: the original prompt once, every delivered completion token
        (once settled: the tokens billed, min(worker's claim, the coordinator's recount))."""
        if self.settled is not None:
            billed = self.settled.usage
            return {
                "prompt_tokens": billed.prompt_tokens,
                "completion_tokens": billed.completion_tokens,
                "total_tokens": billed.prompt_tokens + billed.completion_tokens,
            }
        first = self.attempts[0].observed
        prompt = first.prompt_tokens
        if prompt is None:
            prompt = len(first.prompt_token_ids or ())
        completion = 0
        for attempt in self.attempts:
            counted = attempt.observed.completion_tokens
            completion += counted if counted is not None else attempt.observed.tokens_delivered()
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _usage_chunk(self) -> bytes:
        kind = "chat.completion.chunk" if self.request.endpoint == CHAT else "text_completion"
        chunk = {
            "id": self.response_id,
            "object": kind,
            "created": self.created,
            "model": self.request.model,
            "choices": [],
            "usage": self.usage(),
        }
        return json.dumps(chunk, separators=(",", ":")).encode()

    # ---------------------------------------------------------------- streaming
    async def stream(self) -> AsyncIterator[tuple[list[bytes], bool]]:
        """Rewritten chunk JSON in batches, each with `last`: whatever is queued when a batch
        is taken goes together; the final batch carries the usage (after the receipts are
        settled) or an error chunk."""
        batch: list[bytes] = []
        status = "error"
        try:
            while True:
                stalled = False
                try:
                    event = await self._next_event()
                except _Stalled:
                    stalled, event = True, pb.JobEvent()
                kind = "stalled" if stalled else event.WhichOneof("kind")
                if kind == "chunks":
                    batch += [o for raw in event.chunks.chunks if (o := self._relay_chunk(raw))]
                elif kind == "receipt":
                    self.current.receipt = event.receipt
                    self.current.end()
                    self._dispatcher.attempt_finished(self.current, ok=True)
                    await self._settle()
                    status = "ok"
                    yield (
                        ([*batch, self._usage_chunk()] if self.request.include_usage else batch),
                        True,
                    )
                    return
                elif kind in ("error", "stalled"):
                    failed = self.current
                    failed.end(cancel=stalled)
                    workers_fault = stalled or event.error.http_status >= 500
                    if workers_fault:
                        self._dispatcher.attempt_finished(failed, ok=False)
                    if workers_fault and await self._carry_on():
                        continue
                    if stalled:
                        exc: CoordinatorError = UpstreamTimeout("the worker stopped sending tokens")
                    else:
                        exc = error_from_job(event.error)
                    await self._settle()
                    yield [*batch, error_chunk(exc)], True
                    return
                else:
                    raise UpstreamFailed(f"unexpected {kind} event in a stream")
                if batch and self.current.events.empty():
                    yield batch, False
                    batch = []
        except CoordinatorError as exc:
            yield [*batch, error_chunk(exc)], True
        finally:
            self._finish(status)

    async def _carry_on(self) -> bool:
        """After a failure mid-stream: go on with another worker, if one can."""
        attempt = await self._dispatcher.continue_elsewhere(self)
        if attempt is None:
            return False
        self.attempts.append(attempt)
        self._pending, attempt.first_event = attempt.first_event, None
        return True

    async def whole(self) -> dict[str, Any]:
        """The complete (non-streamed) response, after its receipt is settled."""
        status = "error"
        try:
            result: dict[str, Any] | None = None
            while True:
                event = await self._next_event()
                kind = event.WhichOneof("kind")
                attempt = self.current
                if kind == "response":
                    result = json.loads(event.response)
                    attempt.observed.add(attempt.endpoint, result, streamed=False)
                    self.delivered.add(self.request.endpoint, result, streamed=False)
                    attempt.saw_tokens(time.monotonic())
                    result.update(id=self.response_id, model=self.request.model)
                    if not self.request.wants_token_ids:
                        result.pop("prompt_token_ids", None)
                        for choice in result.get("choices") or ():
                            for key in _TOKEN_ID_KEYS:
                                choice.pop(key, None)
                elif kind == "receipt" and result is not None:
                    attempt.receipt = event.receipt
                    attempt.end()
                    self._dispatcher.attempt_finished(attempt, ok=True)
                    await self._settle()
                    if self.settled is not None and isinstance(result.get("usage"), dict):
                        result["usage"].update(self.usage())  # what was billed
                    status = "ok"
                    return result
                elif kind == "error":
                    attempt.end()
                    if event.error.retryable:
                        self._dispatcher.attempt_finished(attempt, ok=False)
                    raise error_from_job(event.error)
                else:
                    raise UpstreamFailed(f"unexpected {kind} event")
        except _Stalled:
            raise UpstreamTimeout("the worker stopped answering") from None
        finally:
            self._finish(status)

    # ---------------------------------------------------------------- the end
    async def _settle(self) -> None:
        if self.settled is None and not self._done:
            self.settled = await self._dispatcher.settle(self)

    def _finish(self, status: str) -> None:
        """Free every slot; bill what was delivered if the stream ended without settling
        (the client went away, or every worker failed)."""
        if self._done:
            return
        self._done = True
        for attempt in self.attempts:
            attempt.end(cancel=True)
        if self.settled is None and self.delivered.choices:
            self._dispatcher.settle_later(self)
        self._dispatcher.request_finished(self, status)
