"""The worker's one outbound gRPC session to its coordinator.

The worker dials out (no inbound port), proves its identity by signing the coordinator's
challenge together with its advert, then keeps the stream: heartbeats and job events go up,
jobs come down. When the stream breaks it reconnects with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from protocol.advert import PROTOCOL_VERSION, Advert, sign_registration
from protocol.identity import Identity
from protocol.proto import session_pb2 as pb
from protocol.proto import session_pb2_grpc as pb_grpc
from worker_node import __version__
from worker_node.errors import RegistrationRefused
from worker_node.jobs import (
    CHAT,
    COMPLETIONS,
    Chunks,
    Failed,
    Finished,
    JobRunner,
    JobSpec,
    WholeResponse,
)

log = logging.getLogger("agora.worker.session")

_ENDPOINTS = {pb.ENDPOINT_CHAT_COMPLETIONS: CHAT, pb.ENDPOINT_COMPLETIONS: COMPLETIONS}


@dataclass(frozen=True)
class SessionConfig:
    coordinator: str  # host:port of the coordinator's worker gRPC endpoint
    reconnect_initial_s: float = 0.5  # first wait after a lost session
    reconnect_max_s: float = 30.0  # backoff ceiling
    drain_timeout_s: float = 60.0  # on shutdown, how long running jobs may finish
    root_certificates: bytes | None = None  # PEM; set to use TLS


def backoff_delays(initial: float, ceiling: float) -> AsyncIterator[float]:
    """Exponential backoff with full jitter (AWS architecture blog's recommendation)."""

    async def gen() -> AsyncIterator[float]:
        attempt = 0
        while True:
            yield random.uniform(0, min(ceiling, initial * 2**attempt))
            attempt += 1

    return gen()


class WorkerSession:
    def __init__(
        self,
        identity: Identity,
        make_advert: Callable[[], Advert],
        runner: JobRunner,
        config: SessionConfig,
        on_registered: Callable[[str], None] | None = None,
    ) -> None:
        self._identity = identity
        self._make_advert = make_advert
        self._runner = runner
        self._config = config
        self._on_registered = on_registered
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._draining = False

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; reconnect whenever the session is lost."""
        delays = backoff_delays(self._config.reconnect_initial_s, self._config.reconnect_max_s)
        while not stop.is_set():
            connected_at = time.monotonic()
            try:
                await self._session(stop)
            except RegistrationRefused:
                raise
            except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
                log.warning("session to %s lost: %s", self._config.coordinator, _describe(exc))
            if stop.is_set():
                break
            if time.monotonic() - connected_at > 60:  # a long healthy session resets backoff
                delays = backoff_delays(
                    self._config.reconnect_initial_s, self._config.reconnect_max_s
                )
            delay = await anext(delays)
            log.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def _channel(self) -> grpc.aio.Channel:
        options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
        if self._config.root_certificates is not None:
            creds = grpc.ssl_channel_credentials(self._config.root_certificates)
            return grpc.aio.secure_channel(self._config.coordinator, creds, options=options)
        return grpc.aio.insecure_channel(self._config.coordinator, options=options)

    async def _session(self, stop: asyncio.Event) -> None:
        outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.WorkerMessage]:
            while (msg := await outbox.get()) is not None:
                yield msg

        async with self._channel() as channel:
            call = pb_grpc.WorkerSessionStub(channel).Connect(requests())
            try:
                interval = await self._handshake(call, outbox)
                heartbeat = asyncio.create_task(self._heartbeats(outbox, interval))
                stopper = asyncio.create_task(stop.wait())
                try:
                    await self._serve(call, outbox, stopper)
                finally:
                    heartbeat.cancel()
                    stopper.cancel()
                if stop.is_set():
                    await self._drain()
            finally:
                await outbox.put(None)
                call.cancel()

    async def _handshake(
        self,
        call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage],
        outbox: asyncio.Queue[pb.WorkerMessage | None],
    ) -> float:
        hello = pb.Hello(
            public_key=self._identity.public_key,
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
        )
        await outbox.put(pb.WorkerMessage(hello=hello))
        challenge = await self._expect(call, "challenge")
        advert_bytes, signature = sign_registration(
            self._identity, challenge.challenge.nonce, self._make_advert()
        )
        await outbox.put(
            pb.WorkerMessage(register=pb.Register(advert=advert_bytes, signature=signature))
        )
        registered = (await self._expect(call, "registered")).registered
        log.info("registered with %s as %s", self._config.coordinator, registered.node_id)
        if self._on_registered:
            self._on_registered(registered.node_id)
        return max(0.5, registered.heartbeat_interval_ms / 1000)

    async def _expect(
        self,
        call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage],
        kind: str,
    ) -> pb.CoordinatorMessage:
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                raise RegistrationRefused(exc.details() or str(exc.code())) from exc
            raise
        if msg is grpc.aio.EOF or not isinstance(msg, pb.CoordinatorMessage):
            raise ConnectionError("coordinator closed the session during the handshake")
        if msg.WhichOneof("kind") != kind:
            raise ConnectionError(f"expected {kind}, got {msg.WhichOneof('kind')}")
        return msg

    async def _heartbeats(
        self, outbox: asyncio.Queue[pb.WorkerMessage | None], interval: float
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            beat = pb.Heartbeat(sent_at_ms=time.time_ns() // 1_000_000)
            await outbox.put(pb.WorkerMessage(heartbeat=beat))

    async def _serve(
        self,
        call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage],
        outbox: asyncio.Queue[pb.WorkerMessage | None],
        stopper: asyncio.Task[bool],
    ) -> None:
        while not stopper.done():
            reader = asyncio.ensure_future(call.read())
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                reader.cancel()
                return
            msg = reader.result()
            if msg is grpc.aio.EOF or not isinstance(msg, pb.CoordinatorMessage):
                raise ConnectionError("coordinator ended the session")
            kind = msg.WhichOneof("kind")
            if kind == "job":
                self._start_job(msg.job, outbox)
            elif kind == "cancel":
                task = self._jobs.get(msg.cancel.request_id)
                if task:
                    task.cancel()

    def _start_job(self, job: pb.Job, outbox: asyncio.Queue[pb.WorkerMessage | None]) -> None:
        spec = JobSpec(
            request_id=job.request_id,
            model=job.model,
            endpoint=_ENDPOINTS.get(job.endpoint, CHAT),
            body=_json_object(job.body),
            nonce=job.nonce,
        )
        task = asyncio.create_task(self._run_job(spec, outbox))
        self._jobs[spec.request_id] = task
        task.add_done_callback(lambda _t: self._jobs.pop(spec.request_id, None))

    async def _run_job(self, spec: JobSpec, outbox: asyncio.Queue[pb.WorkerMessage | None]) -> None:
        rid = spec.request_id
        try:
            async for out in self._runner.run(spec):
                event = pb.JobEvent(request_id=rid)
                if isinstance(out, Chunks):
                    event.chunks.chunks.extend(out.items)
                elif isinstance(out, WholeResponse):
                    event.response = out.body
                elif isinstance(out, Finished):
                    event.receipt.body = out.receipt.body
                    event.receipt.signature = out.receipt.worker_signature
                elif isinstance(out, Failed):
                    event.error.CopyFrom(
                        pb.JobError(
                            http_status=out.http_status,
                            message=out.message,
                            type=out.type,
                            retryable=out.retryable,
                        )
                    )
                await outbox.put(pb.WorkerMessage(job_event=event))
        except asyncio.CancelledError:
            log.info("job %s cancelled by the coordinator", rid)
            raise
        except Exception as exc:  # a job must always end with an event, never silently
            log.exception("job %s failed", rid)
            error = pb.JobError(http_status=500, message=str(exc), type="worker_error")
            await outbox.put(pb.WorkerMessage(job_event=pb.JobEvent(request_id=rid, error=error)))

    async def _drain(self) -> None:
        if not self._jobs:
            return
        log.info("draining %d running job(s)", len(self._jobs))
        _done, pending = await asyncio.wait(
            list(self._jobs.values()), timeout=self._config.drain_timeout_s
        )
        for task in pending:
            task.cancel()


def _json_object(data: bytes) -> dict[str, object]:
    import json

    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("job body must be a JSON object")
    return value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
