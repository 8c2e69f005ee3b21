"""Run one job against an engine and sign its receipt.

The worker relays the engine's own OpenAI chunks verbatim (so every field the engine supports
reaches the client) and meters what it relayed: the text of each choice for the output hash, and
the engine's usage for the token counts it claims in the receipt.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from protocol.advert import ModelOffer
from protocol.completions import CHAT, Output, prompt_of
from protocol.identity import Identity
from protocol.receipt import Receipt, SignedReceipt, output_digest, prompt_digest, sign_receipt
from worker_node.engines.base import Engine
from worker_node.faults import Fault


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class JobSpec:
    request_id: str
    model: str
    endpoint: str  # CHAT or COMPLETIONS
    body: dict[str, Any]
    nonce: bytes


@dataclass(frozen=True)
class Chunks:
    """Stream chunks (JSON bytes) to relay, in order."""

    items: list[bytes]


@dataclass(frozen=True)
class WholeResponse:
    body: bytes


@dataclass(frozen=True)
class Failed:
    http_status: int
    message: str
    type: str
    retryable: bool


@dataclass(frozen=True)
class Finished:
    receipt: SignedReceipt


JobOutput = Chunks | WholeResponse | Failed | Finished


@dataclass
class _Meter:
    """What the worker saw leave the engine: the output and when it began."""

    endpoint: str
    started_ms: int = field(default_factory=now_ms)
    first_token_ms: int = 0
    output: Output = field(default_factory=Output)

    def add(self, chunk: dict[str, Any], *, streamed: bool) -> None:
        self.output.add(self.endpoint, chunk, streamed=streamed)
        if not self.first_token_ms and any(c.text for c in self.output.choices.values()):
            self.first_token_ms = now_ms()

    def produced(self) -> bool:
        return any(c.text or c.token_ids for c in self.output.choices.values())


def _sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (several data lines join with newlines), or None."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _engine_error(response_body: bytes, status: int) -> Failed:
    message = response_body.decode(errors="replace")[:500]
    err_type = "engine_error"
    try:
        err = json.loads(response_body).get("error") or {}
        message = str(err.get("message") or message)
        err_type = str(err.get("type") or err_type)
    except (ValueError, AttributeError):
        pass
    # 4xx from the engine is the request's fault; another worker would answer the same.
    return Failed(status, message, err_type, retryable=status >= 500)


class JobRunner:
    def __init__(
        self,
        identity: Identity,
        engines: dict[str, Engine],
        offers: dict[str, ModelOffer],
        client: httpx.AsyncClient,
        is_available: Callable[[str], bool] = lambda _model: True,
        fault: Fault | None = None,
    ) -> None:
        self._fault = fault  # a misbehaving mode, for tests only (see worker_node.faults)
        self._identity = identity
        self._engines = engines
        self._offers = offers
        self._client = client
        self._is_available = is_available

    async def run(self, job: JobSpec) -> AsyncIterator[JobOutput]:
        engine = self._engines.get(job.model)
        offer = self._offers.get(job.model)
        if engine is None or offer is None:
            yield Failed(404, f"this node does not serve {job.model!r}", "model_not_found", True)
            return
        if not self._is_available(job.model):
            yield Failed(503, f"the engine for {job.model!r} is restarting", "engine_down", True)
            return
        body = dict(job.body, model=engine.served_model)
        url = f"{engine.base_url}/{'chat/completions' if job.endpoint == CHAT else 'completions'}"
        meter = _Meter(job.endpoint)
        if body.get("stream"):
            body["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
            outputs = self._stream(url, body, job, meter)
        else:
            outputs = self._whole(url, body, job, meter)
        try:
            async for out in outputs:
                yield out
                if isinstance(out, Failed):
                    return
        except httpx.HTTPError as exc:
            yield Failed(502, f"engine unreachable: {exc}", "engine_error", not meter.produced())
            return
        yield Finished(self._sign(job, offer, meter))

    async def _stream(
        self, url: str, body: dict[str, Any], job: JobSpec, meter: _Meter
    ) -> AsyncIterator[JobOutput]:
        """Relay the engine's SSE events; every event that arrived in one read goes out as
        one batch (a fast engine's burst costs one message, not one per token)."""
        async with self._client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                yield _engine_error(await response.aread(), response.status_code)
                return
            pending, relayed, fault = b"", 0, self._fault
            async for data in response.aiter_bytes():
                pending += data.replace(b"\r\n", b"\n")
                *events, pending = pending.split(b"\n\n")
                batch: list[bytes] = []
                for event in events:
                    payload = _sse_data(event)
                    if payload is None:
                        continue
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        if batch:
                            yield Chunks(batch)
                        err = chunk["error"]
                        status = int(err.get("code") or 500)
                        yield Failed(status, str(err.get("message")), "engine_error", False)
                        return
                    if fault is not None:
                        chunk = fault.rewrite(chunk)
                        payload = json.dumps(chunk).encode()
                    meter.add(chunk, streamed=True)
                    if fault is not None and fault.withholds(relayed):
                        continue  # metered (and billed) but never relayed
                    batch.append(payload)
                    relayed += 1
                if batch:
                    if fault is not None:
                        await fault.before_batch(len(batch))
                    yield Chunks(batch)

    async def _whole(
        self, url: str, body: dict[str, Any], job: JobSpec, meter: _Meter
    ) -> AsyncIterator[JobOutput]:
        response = await self._client.post(url, json=body)
        if response.status_code != 200:
            yield _engine_error(response.content, response.status_code)
            return
        if self._fault is None:
            meter.add(response.json(), streamed=False)
            yield WholeResponse(response.content)
            return
        await self._fault.before_batch()
        rewritten = self._fault.rewrite(response.json())
        meter.add(rewritten, streamed=False)
        yield WholeResponse(json.dumps(rewritten).encode())

    def _sign(self, job: JobSpec, offer: ModelOffer, meter: _Meter) -> SignedReceipt:
        finished = now_ms()
        receipt = Receipt(
            request_id=job.request_id,
            model=job.model,
            worker_id=self._identity.node_id,
            coordinator_nonce=job.nonce.hex(),
            prompt_sha256=prompt_digest(prompt_of(job.endpoint, job.body)),
            output_sha256=output_digest(meter.output.texts()),
            prompt_tokens=meter.output.prompt_tokens or 0,
            completion_tokens=meter.output.completion_tokens or 0,
            price_prompt_per_mtok=offer.price_prompt_per_mtok,
            price_completion_per_mtok=offer.price_completion_per_mtok,
            started_at_ms=meter.started_ms,
            ttft_ms=max(0, (meter.first_token_ms or finished) - meter.started_ms),
            finished_at_ms=finished,
            finish_reason=meter.output.finish_reason(),
        )
        if self._fault is not None:
            return self._fault.sign(self._identity, receipt)
        return sign_receipt(self._identity, receipt)
