"""Run one job against an engine and sign its receipt.

The worker reads the engine's SSE once (msgspec) and sends typed token frames: everything one
choice produced since the last send, merged into one `TokenFrame` (text, token ids, finish
reason), so the coordinator renders its clients' SSE without parsing JSON again. Rare fields
(tool-call deltas, logprobs) travel as the engine's own JSON, one frame per engine chunk. The
chunks wait in the job's `FrameBuffer` until the session's sender takes them, so a token costs
a decode and a merge, not a message. The worker meters every chunk it relays the same way the
coordinator reads frames (protocol.completions.Output): the text of each choice for the output
hash, the engine's usage for the counts it claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from protocol.advert import ModelOffer
from protocol.completions import CHAT, COMPLETIONS, EMBEDDINGS, Output, prompt_of
from protocol.identity import Identity
from protocol.receipt import Receipt, SignedReceipt, output_digest, prompt_digest, sign_receipt
from worker_node.adapters import AdapterSlots, Fetch
from worker_node.asks import Asks
from worker_node.engine_client import EngineClients
from worker_node.engines.base import Engine
from worker_node.errors import AdapterError, AdapterRefused, AdapterSlotsFull, EngineFull
from worker_node.faults import Fault
from worker_node.frames import FrameBuffer

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_JSON = {"content-type": "application/json"}
_ENGINE_PATHS = {CHAT: "chat/completions", COMPLETIONS: "completions", EMBEDDINGS: "embeddings"}
# statuses that mean "full, try later or elsewhere": back-pressure, not a broken worker
OVERLOADED_STATUSES = frozenset({429, 503})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class JobSpec:
    request_id: str
    model: str
    endpoint: str  # CHAT, COMPLETIONS or EMBEDDINGS
    body: dict[str, Any]
    nonce: bytes
    adapter: str = ""  # sha256 of the LoRA adapter to run with ("" = the base model)
    fetch_adapter: Fetch | None = None  # how to get it if the node lacks it
    batch: bool = False  # a Batch API line: billed at the offer's batch prices
    # the offer it was routed and is signed at (its session's advert; None: none of the
    # node's offers is for this model)
    offer: ModelOffer | None = None
    # set when the coordinator asks to end the job now and sign for what was generated
    stop: asyncio.Event = field(default_factory=asyncio.Event, compare=False)


def _adapter_failure(exc: AdapterError) -> Failed:
    if isinstance(exc, AdapterSlotsFull):
        return Failed(503, str(exc), "adapter_slots_full", retryable=True, overloaded=True)
    kind = "adapter_refused" if isinstance(exc, AdapterRefused) else "adapter_unavailable"
    return Failed(502, str(exc), kind, retryable=True)


@dataclass(frozen=True)
class FramesWaiting:
    """The job's buffer holds frames for the sender (told once per take, not per token)."""

    buffer: FrameBuffer


@dataclass(frozen=True)
class WholeResponse:
    body: bytes


@dataclass(frozen=True)
class Failed:
    http_status: int
    message: str
    type: str
    retryable: bool
    overloaded: bool = False  # the engine or node is full: back-pressure, not a fault


@dataclass(frozen=True)
class Finished:
    receipt: SignedReceipt


JobOutput = FramesWaiting | WholeResponse | Failed | Finished


@dataclass
class _Meter:
    """What the worker saw leave the engine: the output and when it began."""

    started_ms: int = field(default_factory=now_ms)
    first_token_ms: int = 0
    output: Output = field(default_factory=Output)

    def add_chunk(self, endpoint: str, chunk: dict[str, Any]) -> None:
        self.output.add(endpoint, chunk, streamed=True)
        self._saw_output()

    def add_whole(self, endpoint: str, response: dict[str, Any]) -> None:
        self.output.add(endpoint, response, streamed=False)
        self._saw_output()

    def _saw_output(self) -> None:
        if not self.first_token_ms and self.output.produced:
            self.first_token_ms = now_ms()

    def produced(self) -> bool:
        return self.output.produced


def _sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (several data lines join with newlines), or None."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _tokens_in(chunk: dict[str, Any]) -> int:
    """Token ids an engine chunk carries (a busy engine may put several in one)."""
    return sum(len(c.get("token_ids") or ()) for c in chunk.get("choices") or ())


def _engine_error(response_body: bytes, status: int) -> Failed:
    message = response_body.decode(errors="replace")[:500]
    err_type = "engine_error"
    try:
        err = _decode(response_body).get("error") or {}
        message = str(err.get("message") or message)
        err_type = str(err.get("type") or err_type)
    except (msgspec.DecodeError, AttributeError):
        pass
    if status in OVERLOADED_STATUSES:
        return Failed(status, message or "engine is full", "engine_overloaded", True, True)
    # 4xx from the engine is the request's fault; another worker would answer the same.
    return Failed(status, message, err_type, retryable=status >= 500)


async def _send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    """POST to the engine (the response's body is read by the caller), once more if a
    kept-alive connection turned out closed before any answer came (the engine's keep-alive
    timeout raced our reuse of it)."""
    data = _encode(body)
    for attempt in range(2):
        try:
            return await session.post(url, data=data, headers=_JSON)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt:
                raise
    raise AssertionError("unreachable")


# how an engine call can break: the client's errors, and a read that timed out
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, EngineFull)


def transport_error(exc: BaseException, produced: bool) -> Failed:
    """An engine call that broke, with its cause (never an empty message)."""
    detail = str(exc) or str(exc.__cause__ or "") or "no detail"
    message = f"engine unreachable: {type(exc).__name__}: {detail}"
    if isinstance(exc, EngineFull):  # every engine connection busy: the node is full
        return Failed(503, f"node is full: {detail}", "engine_overloaded", True, True)
    return Failed(502, message, "engine_error", retryable=not produced)


class JobRunner:
    def __init__(
        self,
        identity: Identity,
        engines: dict[str, Engine],
        asks: Asks,
        clients: EngineClients,
        is_available: Callable[[str], bool] = lambda _model: True,
        fault: Fault | None = None,
        adapters: Mapping[str, AdapterSlots] | None = None,
    ) -> None:
        self._adapters = adapters or {}  # per model whose engine loads adapters
        self._fault = fault  # a misbehaving mode, for tests only (see worker_node.faults)
        self._identity = identity
        self._engines = engines
        self._asks = asks
        self._clients = clients
        self._is_available = is_available

    async def run(self, job: JobSpec) -> AsyncIterator[JobOutput]:
        engine = self._engines.get(job.model)
        offer = job.offer
        if engine is None or offer is None:
            yield Failed(404, f"this node does not serve {job.model!r}", "model_not_found", True)
            return
        if not self._is_available(job.model):
            yield Failed(503, f"the engine for {job.model!r} is restarting", "engine_down", True)
            return
        slots = self._adapters.get(job.model)
        if job.adapter and slots is None:
            yield Failed(404, f"this node loads no adapters for {job.model!r}",
                         "adapter_unavailable", True)  # fmt: skip
            return
        async with contextlib.AsyncExitStack() as held:
            held.enter_context(self._asks.running(job.model))  # what auto pricing reads
            served = engine.served_model
            if job.adapter and slots is not None:
                try:  # the adapter stays loaded until the job ends
                    served = await held.enter_async_context(
                        slots.use(job.adapter, job.fetch_adapter)
                    )
                except AdapterError as exc:
                    yield _adapter_failure(exc)
                    return
            async for out in self._run(job, offer, engine, served):
                yield out

    async def _run(
        self, job: JobSpec, offer: ModelOffer, engine: Engine, served: str
    ) -> AsyncIterator[JobOutput]:
        body = dict(job.body, model=served)
        url = f"{engine.base_url}/{_ENGINE_PATHS[job.endpoint]}"
        meter = _Meter()
        if job.endpoint == EMBEDDINGS:  # vectors travel as base64 whatever the client asked
            body["encoding_format"] = "base64"  # (protocol.completions: exact and compact)
            outputs = self._whole(url, body, job, meter)
        elif body.get("stream"):
            body["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
            outputs = self._stream(url, body, job, meter)
        else:
            outputs = self._whole(url, body, job, meter)
        try:
            async for out in outputs:
                yield out
                if isinstance(out, Failed):
                    return
        except TRANSPORT_ERRORS as exc:
            yield transport_error(exc, meter.produced())
            return
        yield Finished(self._sign(job, offer, meter))

    async def _stream(
        self, url: str, body: dict[str, Any], job: JobSpec, meter: _Meter
    ) -> AsyncIterator[JobOutput]:
        """Relay the engine's SSE events into the job's frame buffer (what waits there when
        the sender is ready goes out as one message: a burst costs one, not one per token)."""
        async with self._clients.lease() as session:
            response = await _send(session, url, body)
            async for out in self._relay(response, job, meter):
                yield out

    async def _relay(
        self, response: aiohttp.ClientResponse, job: JobSpec, meter: _Meter
    ) -> AsyncIterator[JobOutput]:
        try:
            if response.status != 200:
                yield _engine_error(await response.read(), response.status)
                return
            fault = self._fault
            buffer = FrameBuffer(job.request_id, job.endpoint)
            pending, relayed = b"", 0
            async for data in response.content.iter_any():
                pending += data.replace(b"\r\n", b"\n")
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    payload = _sse_data(event)
                    if payload is None:
                        continue
                    if payload == b"[DONE]":
                        break
                    chunk = _decode(payload)
                    if "error" in chunk:  # after the frames already waiting (queue order)
                        err = chunk["error"] or {}
                        status = int(err.get("code") or 500)
                        message = str(err.get("message") or "the engine failed mid-stream")
                        yield Failed(status, message, "engine_error", False)
                        return
                    if fault is not None:
                        chunk = fault.rewrite(chunk)
                        if fault.withholds(relayed):  # metered, never relayed
                            meter.add_chunk(job.endpoint, chunk)
                            continue
                        if fault.paces_each_chunk:  # each chunk after its delay, on its own
                            await fault.before_batch(_tokens_in(chunk))
                    meter.add_chunk(job.endpoint, chunk)
                    relayed += 1
                    if buffer.add(chunk):
                        yield FramesWaiting(buffer)
                if job.stop.is_set():  # signed for what was generated (closing aborts it)
                    return
        finally:
            response.release()  # back to the pool once read to the end, else closed

    async def _whole(
        self, url: str, body: dict[str, Any], job: JobSpec, meter: _Meter
    ) -> AsyncIterator[JobOutput]:
        async with self._clients.lease() as session:
            response = await _send(session, url, body)
            try:
                content = await response.read()
            finally:
                response.release()
        if response.status != 200:
            yield _engine_error(content, response.status)
            return
        if self._fault is None:
            meter.add_whole(job.endpoint, _decode(content))
            yield WholeResponse(content)
            return
        await self._fault.before_batch()
        rewritten = self._fault.rewrite(_decode(content))
        meter.add_whole(job.endpoint, rewritten)
        yield WholeResponse(_encode(rewritten))

    def _sign(self, job: JobSpec, offer: ModelOffer, meter: _Meter) -> SignedReceipt:
        finished = now_ms()
        price_prompt, price_completion = offer.prices(job.adapter, job.batch)
        # a job stopped early has no usage from its engine: its counts are its token ids
        counted = meter.output.token_counts()
        prompt_tokens = meter.output.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = counted[0]
        cached = min(meter.output.cached_prompt_tokens, prompt_tokens)
        cached_price = offer.cached_price(job.adapter, job.batch) if cached else 0
        receipt = Receipt(
            request_id=job.request_id,
            model=job.model,
            worker_id=self._identity.node_id,
            coordinator_nonce=job.nonce.hex(),
            prompt_sha256=prompt_digest(prompt_of(job.endpoint, job.body)),
            output_sha256=output_digest(meter.output.texts()),
            prompt_tokens=prompt_tokens,
            completion_tokens=(
                counted[1]
                if meter.output.completion_tokens is None
                else meter.output.completion_tokens
            ),
            price_prompt_per_mtok=price_prompt,
            price_completion_per_mtok=price_completion,
            started_at_ms=meter.started_ms,
            ttft_ms=max(0, (meter.first_token_ms or finished) - meter.started_ms),
            finished_at_ms=finished,
            finish_reason=meter.output.finish_reason(),
            adapter_sha256=job.adapter,
            cached_prompt_tokens=cached,
            price_cached_prompt_per_mtok=cached_price,
        )
        if self._fault is not None:
            return self._fault.sign(self._identity, receipt)
        return sign_receipt(self._identity, receipt)
