"""The request path: pick a worker, send it the job, relay its output, settle its receipt.

Errors before the first token are real HTTP errors (and a retryable one moves the job to the
next-ranked worker); errors after it follow the SSE convention of a final `{"error": …}` chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from billing.pricing import Price, charge_for
from coordinator.config import CoordinatorSettings
from coordinator.errors import (
    CoordinatorError,
    InsufficientCredit,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
)
from coordinator.services.accounts import Accounts
from coordinator.services.registry import Registry, WorkerConnection
from coordinator.services.routing import Candidate, Decision, RouteRequest, rank
from coordinator.services.settlement import JobFacts, Observed, ReceiptRejected, Settlement
from protocol.proto import session_pb2 as pb
from protocol.receipt import SignedReceipt, prompt_digest

log = logging.getLogger("agora.coordinator.gateway")

CHAT = "chat"
COMPLETIONS = "completions"
_ENDPOINT_PB = {CHAT: pb.ENDPOINT_CHAT_COMPLETIONS, COMPLETIONS: pb.ENDPOINT_COMPLETIONS}
MAX_ATTEMPTS = 3  # workers tried before the first token, at most


@dataclass(frozen=True)
class CompletionRequest:
    endpoint: str  # CHAT or COMPLETIONS
    model: str
    body: dict[str, Any]  # the client's JSON, validated; unknown fields pass through
    stream: bool
    include_usage: bool
    max_tokens: int | None

    @property
    def prompt(self) -> Any:
        return self.body.get("messages") if self.endpoint == CHAT else self.body.get("prompt")


def prompt_token_bound(request: CompletionRequest) -> int:
    """An upper bound of prompt tokens without a tokenizer: byte-level BPE never produces more
    tokens than bytes, and the JSON framing over-covers chat-template tokens."""
    return len(json.dumps(request.prompt, ensure_ascii=False).encode()) + 16


def error_from_job(err: pb.JobError) -> CoordinatorError:
    classes: dict[int, type[CoordinatorError]] = {
        400: InvalidRequest,
        404: ModelNotFound,
        413: PayloadTooLarge,
        422: InvalidRequest,
        429: RateLimited,
        503: NoCapacity,
        504: UpstreamTimeout,
    }
    return classes.get(err.http_status, UpstreamFailed)(err.message or "the worker failed")


def error_chunk(exc: CoordinatorError) -> bytes:
    body = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    return json.dumps({"error": body}).encode()


class Gateway:
    def __init__(
        self,
        registry: Registry,
        accounts: Accounts,
        settlement: Settlement,
        settings: CoordinatorSettings,
    ) -> None:
        self.registry = registry
        self._accounts = accounts
        self._settlement = settlement
        self._settings = settings

    @property
    def idle_timeout_s(self) -> float:
        return self._settings.idle_token_timeout_s

    def client_price(self, price: Price) -> Price:
        return price.with_fee(self._settlement.fee_bps)

    def list_models(self) -> list[dict[str, Any]]:
        out = []
        for name, advertising in sorted(self.registry.models().items()):
            workers = [w for w in advertising if w.available(name)]
            offers = [o for w in advertising if (o := w.offer(name))]
            cheapest = min(
                offers, key=lambda o: (o.price_completion_per_mtok, o.price_prompt_per_mtok)
            )
            price = self.client_price(
                Price(cheapest.price_prompt_per_mtok, cheapest.price_completion_per_mtok)
            )
            out.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "agora",
                    "context_length": max(o.context_length for o in offers),
                    "pricing": {
                        "prompt_per_mtok": price.prompt_per_mtok,
                        "completion_per_mtok": price.completion_per_mtok,
                        "unit": "micro-USD per 1M tokens",
                    },
                    "workers": len(workers),  # available now
                    "available": bool(workers),
                    "available_slots": sum(max(0, w.free_slots(name)) for w in workers),
                }
            )
        return out

    async def start(self, client: str, request: CompletionRequest) -> Completion:
        workers = self.registry.serving(request.model)
        if not workers:
            if self.registry.advertised(request.model):
                raise NoCapacity(
                    f"No worker serving `{request.model}` is available right now; retry shortly.",
                    retry_after_s=self._settings.retry_after_s,
                )
            raise ModelNotFound(
                f"The model `{request.model}` does not exist or no worker serves it right now.",
                param="model",
            )
        body = dict(request.body)
        context = max(
            (o.context_length for w in workers if (o := w.offer(request.model))), default=0
        )
        max_tokens = request.max_tokens or context
        if not max_tokens:  # keep the cost bound a real bound
            max_tokens = body["max_tokens"] = self._settings.default_max_tokens
        route = RouteRequest(request.model, prompt_token_bound(request), max_tokens)
        decision = rank(route, [self._candidate(w, request.model) for w in workers])
        if not decision.ranked:
            raise NoCapacity(
                f"Every worker serving `{request.model}` is busy; retry shortly.",
                retry_after_s=self._settings.retry_after_s,
            )
        balance = await asyncio.to_thread(self._accounts.balance, client)
        request_id = uuid.uuid4().hex
        last_error: CoordinatorError | None = None
        for scored in decision.ranked[:MAX_ATTEMPTS]:
            conn = self.registry.get(scored.node_id)
            offer = conn.offer(request.model) if conn else None
            if conn is None or offer is None or conn.closed:
                continue
            price = Price(offer.price_prompt_per_mtok, offer.price_completion_per_mtok)
            bound = charge_for(price, route.prompt_tokens, max_tokens, self._settlement.fee_bps)
            if balance < bound.total:
                raise InsufficientCredit(
                    f"This request may cost up to {bound.total} micro-units; the balance is "
                    f"{balance}. Lower max_tokens or add credit."
                )
            facts = JobFacts(
                request_id=request_id,
                client=client,
                worker_id=conn.node_id,
                model=request.model,
                nonce_hex=os.urandom(16).hex(),
                prompt_sha256=prompt_digest(request.prompt),
                price=price,
            )
            job = pb.Job(
                request_id=request_id,
                model=request.model,
                endpoint=_ENDPOINT_PB[request.endpoint],
                body=json.dumps(body).encode(),
                nonce=bytes.fromhex(facts.nonce_hex),
                deadline_ms=int((time.time() + self._settings.first_token_timeout_s) * 1000),
            )
            events = conn.open_job(job)
            try:
                first = await asyncio.wait_for(
                    events.get(), timeout=self._settings.first_token_timeout_s
                )
            except TimeoutError:
                conn.close_job(request_id, request.model, cancel=True)
                last_error = UpstreamTimeout(f"worker {conn.node_id} sent nothing in time")
                continue
            if first.WhichOneof("kind") == "error":
                conn.close_job(request_id, request.model)
                last_error = error_from_job(first.error)
                if isinstance(last_error, NoCapacity):
                    last_error.retry_after_s = self._settings.retry_after_s
                if first.error.retryable:
                    log.warning(
                        "worker %s failed before output: %s", conn.node_id, first.error.message
                    )
                    continue
                raise last_error
            return Completion(self, request, conn, facts, events, first, decision)
        raise last_error or NoCapacity(
            "No worker could take the request.", retry_after_s=self._settings.retry_after_s
        )

    def _candidate(self, conn: WorkerConnection, model: str) -> Candidate:
        offer = conn.offer(model)
        assert offer is not None
        return Candidate(
            node_id=conn.node_id,
            price_prompt_per_mtok=offer.price_prompt_per_mtok,
            price_completion_per_mtok=offer.price_completion_per_mtok,
            in_flight=conn.in_flight.get(model, 0),
            max_concurrency=offer.max_concurrency,
        )

    async def settle(
        self, facts: JobFacts, receipt: pb.SignedReceipt, observed: Observed
    ) -> SignedReceipt | None:
        signed = SignedReceipt(body=receipt.body, worker_signature=receipt.signature)
        try:
            settled = await self._settlement.settle(facts, signed, observed)
        except ReceiptRejected as exc:
            log.warning(
                "receipt for %s from %s rejected: %s", facts.request_id, facts.worker_id, exc
            )
            return None
        return settled.receipt


class Completion:
    """One dispatched job whose first event has arrived; relays the rest."""

    def __init__(
        self,
        gateway: Gateway,
        request: CompletionRequest,
        conn: WorkerConnection,
        facts: JobFacts,
        events: asyncio.Queue[pb.JobEvent],
        first: pb.JobEvent,
        decision: Decision,
    ) -> None:
        self._gateway = gateway
        self._request = request
        self._conn = conn
        self.facts = facts
        self._events = events
        self._first: pb.JobEvent | None = first
        self.decision = decision
        prefix = "chatcmpl" if request.endpoint == CHAT else "cmpl"
        self.response_id = f"{prefix}-{facts.request_id}"
        self.observed = Observed(texts={})
        self.receipt: SignedReceipt | None = None
        self._settled = False

    @property
    def worker_id(self) -> str:
        return self._conn.node_id

    async def _next_event(self) -> pb.JobEvent:
        if self._first is not None:
            event, self._first = self._first, None
            return event
        try:
            return await asyncio.wait_for(self._events.get(), timeout=self._gateway.idle_timeout_s)
        except TimeoutError:
            raise UpstreamTimeout("the worker stopped sending tokens") from None

    def _close(self, *, finished: bool = False) -> None:
        """Release the worker slot (idempotent). Called as soon as the worker's last event is
        in, before the client sees the end: a client that immediately sends its next request
        must find the slot free."""
        self._conn.close_job(
            self.facts.request_id, self._request.model, cancel=not (finished or self._settled)
        )

    async def _finish(self, receipt: pb.SignedReceipt) -> None:
        self.receipt = await self._gateway.settle(self.facts, receipt, self.observed)
        self._settled = True

    def _rewrite(self, raw: bytes) -> bytes | None:
        chunk = json.loads(raw)
        chunk["id"] = self.response_id
        chunk["model"] = self._request.model
        for choice in chunk.get("choices") or ():
            self._observe_choice(choice, streamed=True)
        usage = chunk.get("usage")
        if usage:
            self.observed.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.observed.completion_tokens = int(usage.get("completion_tokens") or 0)
        if not self._request.include_usage:
            if usage and not chunk.get("choices"):
                return None  # the usage-only chunk the worker always asks the engine for
            chunk.pop("usage", None)
        return json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()

    def _observe_choice(self, choice: dict[str, Any], *, streamed: bool) -> None:
        index = int(choice.get("index", 0))
        if self._request.endpoint == COMPLETIONS:
            text = choice.get("text")
        else:
            text = (choice.get("delta" if streamed else "message") or {}).get("content")
        self.observed.texts[index] = self.observed.texts.get(index, "") + (
            text if isinstance(text, str) else ""
        )

    async def stream(self) -> AsyncIterator[tuple[list[bytes], bool]]:
        """Rewritten chunk JSON in batches, each with `last`: whatever is queued when a batch
        is taken goes together, and the final batch carries the end of the stream (after the
        receipt is settled) or an error chunk if the job failed mid-stream."""
        batch: list[bytes] = []
        try:
            while True:
                event = await self._next_event()
                kind = event.WhichOneof("kind")
                if kind == "chunks":
                    batch += [out for raw in event.chunks.chunks if (out := self._rewrite(raw))]
                elif kind == "receipt":
                    self._close(finished=True)
                    await self._finish(event.receipt)
                    yield batch, True
                    return
                elif kind == "error":
                    self._close(finished=True)
                    yield [*batch, error_chunk(error_from_job(event.error))], True
                    return
                else:
                    raise UpstreamFailed(f"unexpected {kind} event in a stream")
                if batch and self._events.empty():
                    yield batch, False
                    batch = []
        except CoordinatorError as exc:
            yield [*batch, error_chunk(exc)], True
        finally:
            self._close()

    async def whole(self) -> dict[str, Any]:
        """The complete (non-streamed) response, after its receipt is settled."""
        try:
            result: dict[str, Any] | None = None
            while True:
                event = await self._next_event()
                kind = event.WhichOneof("kind")
                if kind == "response":
                    result = json.loads(event.response)
                    result["id"] = self.response_id
                    result["model"] = self._request.model
                    for choice in result.get("choices") or ():
                        self._observe_choice(choice, streamed=False)
                    usage = result.get("usage") or {}
                    self.observed.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    self.observed.completion_tokens = int(usage.get("completion_tokens") or 0)
                elif kind == "receipt" and result is not None:
                    self._close(finished=True)
                    await self._finish(event.receipt)
                    return result
                elif kind == "error":
                    raise error_from_job(event.error)
                else:
                    raise UpstreamFailed(f"unexpected {kind} event")
        finally:
            self._close()
