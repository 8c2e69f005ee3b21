"""The worker's one outbound gRPC session to its coordinator.

The worker dials out (no inbound port), proves its identity by signing the coordinator's
challenge together with its advert, then keeps the stream: heartbeats and job events go up,
jobs come down. When the stream breaks it reconnects with exponential backoff and jitter and
registers again. On shutdown it drains: tells the coordinator to route nothing new, finishes the
running jobs (up to a deadline), then closes its side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import msgspec

from protocol.advert import PROTOCOL_VERSION, Advert, sign_registration
from protocol.completions import CHAT, COMPLETIONS, EMBEDDINGS
from protocol.identity import Identity
from protocol.market import DemandBoard
from protocol.proto import session_pb2 as pb
from protocol.proto import session_pb2_grpc as pb_grpc
from worker_node import __version__
from worker_node.errors import ProtocolMismatch, RegistrationRefused
from worker_node.frames import FrameBuffer, merge_frames
from worker_node.jobs import (
    Failed,
    Finished,
    FramesWaiting,
    JobRunner,
    JobSpec,
    WholeResponse,
)
from worker_node.session_requests import SessionRequests

log = logging.getLogger("agora.worker.session")

_ENDPOINTS = {
    pb.ENDPOINT_CHAT_COMPLETIONS: CHAT,
    pb.ENDPOINT_COMPLETIONS: COMPLETIONS,
    pb.ENDPOINT_EMBEDDINGS: EMBEDDINGS,
}
# messages, and job frame buffers whose frames are taken when the stream is ready for them
Outbox = asyncio.Queue[pb.WorkerMessage | FrameBuffer | None]
Call = grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage]


@dataclass(frozen=True)
class SessionConfig:
    coordinator: str  # host:port of the coordinator's worker gRPC endpoint
    reconnect_initial_s: float = 0.25  # first wait after a lost session
    reconnect_max_s: float = 4.0  # backoff ceiling: a restarted coordinator is found quickly
    drain_timeout_s: float = 60.0  # on shutdown, how long running jobs may finish
    root_certificates: bytes | None = None  # PEM; set to use TLS
    # stop retrying after this many failed connects in a row (None = retry forever); a node
    # that discovered this coordinator then finds another instead
    give_up_after: int | None = None


def backoff_delays(initial: float, ceiling: float) -> AsyncIterator[float]:
    """Exponential backoff with full jitter (spreads a fleet's reconnects after an outage)."""

    async def gen() -> AsyncIterator[float]:
        attempt = 0
        while True:
            yield random.uniform(initial / 2, min(ceiling, initial * 2**attempt))
            attempt += 1

    return gen()


MAX_BATCH = 256  # job events per gRPC message
# adverts sent on a session that jobs may still name (a job routed just before an advert took
# effect names the one before; more are kept for adverts a coordinator did not take)
SENT_KEPT = 8
ADVERT_GAP_S = 0.5  # between two adverts on a session (the coordinator ignores closer ones)
MIN_BEAT_GAP_S = 0.5  # early heartbeats (job counts, engine state) come at most this often


async def outgoing(outbox: Outbox) -> AsyncIterator[pb.WorkerMessage]:
    """The request stream: whatever is queued when the stream is ready to send goes out
    together, job events packed into one batch message (order kept); a job's frame buffer is
    taken only now, so everything it gathered meanwhile leaves in one frames event."""
    while True:
        item = await outbox.get()
        if item is None:
            return
        batch: list[pb.JobEvent] = []
        open_frames: dict[str, pb.Frames] = {}  # per job: its frames event in this batch
        while item is not None:
            if isinstance(item, FrameBuffer):
                frames = item.take()
                merged = open_frames.get(item.request_id)
                if frames is not None and merged is not None:  # a job's frames go as one
                    merge_frames(merged, frames)
                elif frames is not None:
                    batch.append(pb.JobEvent(request_id=item.request_id, frames=frames))
                    open_frames[item.request_id] = batch[-1].frames
            elif item.WhichOneof("kind") == "job_event":
                event = item.job_event
                merged = open_frames.get(event.request_id)
                if event.WhichOneof("kind") != "frames":
                    open_frames.pop(event.request_id, None)
                    batch.append(event)
                elif merged is not None:
                    merge_frames(merged, event.frames)
                else:
                    batch.append(event)
                    open_frames[event.request_id] = event.frames
            else:
                if batch:
                    yield _events_message(batch)
                    batch, open_frames = [], {}
                yield item
            if outbox.empty() or len(batch) >= MAX_BATCH:
                break
            item = outbox.get_nowait()
        if batch:
            yield _events_message(batch)
        if item is None:
            return


def _events_message(batch: list[pb.JobEvent]) -> pb.WorkerMessage:
    if len(batch) == 1:
        return pb.WorkerMessage(job_event=batch[0])
    return pb.WorkerMessage(job_events=pb.JobEventBatch(events=batch))


def job_event(request_id: str, out: Failed | Finished | WholeResponse) -> pb.JobEvent:
    event = pb.JobEvent(request_id=request_id)
    if isinstance(out, WholeResponse):
        event.response = out.body
    elif isinstance(out, Finished):
        event.receipt.body = out.receipt.body
        event.receipt.signature = out.receipt.worker_signature
    else:
        event.error.CopyFrom(
            pb.JobError(
                http_status=out.http_status,
                message=out.message,
                type=out.type,
                retryable=out.retryable,
                overloaded=out.overloaded,
            )
        )
    return event


class WorkerSession:
    def __init__(
        self,
        identity: Identity,
        make_advert: Callable[[str], Advert],  # for the coordinator of this id
        runner: JobRunner,
        config: SessionConfig,
        heartbeat: Callable[[], Awaitable[pb.Heartbeat]] | None = None,
        on_registered: Callable[[str], None] | None = None,
    ) -> None:
        self._identity = identity
        self._make_advert = make_advert
        self._runner = runner
        self._config = config
        self._heartbeat = heartbeat
        self._on_registered = on_registered
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}  # per running job: end it and sign
        self._job_models: dict[str, str] = {}  # request id -> model
        # set by a SessionPool: the node's jobs per model through its other sessions, and a
        # hook to tell those sessions when this one's jobs change
        self.jobs_elsewhere: Callable[[str], int] = lambda _model: 0
        self.on_jobs_changed: Callable[[], None] = lambda: None
        # set by a SessionPool: the coordinator named other processes of itself to connect to
        self.on_siblings: Callable[[list[str]], None] = lambda _targets: None
        self._requests = SessionRequests()  # adapters and boards asked of the coordinator
        # while connected: where messages go, the challenge signed, who signed the board, the
        # adverts sent (the one in force, and the one before it for jobs already on the wire),
        # and whether the coordinator takes a new advert mid-session (it answered a board)
        self._outbox: Outbox | None = None
        self._nonce = b""
        self.coordinator_id = ""
        self._sent: deque[Advert] = deque(maxlen=SENT_KEPT)
        self._readvertises = False
        self._advertised_at = float("-inf")  # monotonic time of the last advert sent
        self._pending: asyncio.TimerHandle | None = None  # a paced advert, to send shortly
        self._beat_now = asyncio.Event()
        self.state = "starting"  # connecting | connected | reconnecting | draining | stopped | lost
        self.connected_since: float | None = None

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

    def jobs_for(self, model: str) -> int:
        return sum(1 for m in self._job_models.values() if m == model)

    def notify(self) -> None:
        """Send a heartbeat now (e.g. an engine went down or came back)."""
        self._beat_now.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (then drain); reconnect whenever the session is lost."""
        delays = backoff_delays(self._config.reconnect_initial_s, self._config.reconnect_max_s)
        failures = 0
        while not stop.is_set():
            self.state = "connecting"
            try:
                await self._session(stop)
            except (RegistrationRefused, ProtocolMismatch):
                self.state = "stopped"
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("coordinator %s: %s", self._config.coordinator, _describe(exc))
            except ConnectionError as exc:
                log.warning("coordinator %s: %s", self._config.coordinator, exc)
            if stop.is_set():
                break
            failures = 0 if self.connected_since else failures + 1
            limit = self._config.give_up_after
            if limit is not None and failures >= limit:
                log.warning("giving up on coordinator %s", self._config.coordinator)
                self.state = "lost"
                return
            if self.connected_since and time.monotonic() - self.connected_since > 60:
                delays = backoff_delays(
                    self._config.reconnect_initial_s, self._config.reconnect_max_s
                )
            self.connected_since = None
            self.state = "reconnecting"
            delay = await anext(delays)
            log.info("reconnecting to %s in %.1f s", self._config.coordinator, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        self.state = "stopped"

    def _channel(self) -> grpc.aio.Channel:
        options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
        if self._config.root_certificates is not None:
            creds = grpc.ssl_channel_credentials(self._config.root_certificates)
            return grpc.aio.secure_channel(self._config.coordinator, creds, options=options)
        return grpc.aio.insecure_channel(self._config.coordinator, options=options)

    async def _session(self, stop: asyncio.Event) -> None:
        outbox: Outbox = asyncio.Queue()

        async with self._channel() as channel:
            call: Call = pb_grpc.WorkerSessionStub(channel).Connect(outgoing(outbox))
            try:
                interval = await self._handshake(call, outbox)
                self._outbox = outbox
                beats = asyncio.create_task(self._heartbeats(outbox, interval))
                drainer = asyncio.create_task(self._drain_when(stop, outbox))
                try:
                    await self._serve(call, outbox)
                finally:
                    beats.cancel()
                    drainer.cancel()
            finally:
                outbox.put_nowait(None)
                call.cancel()
                self._outbox = None
                self._requests.fail("the session with the coordinator ended")

    async def _handshake(self, call: Call, outbox: Outbox) -> float:
        hello = pb.Hello(
            public_key=self._identity.public_key,
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
        )
        await outbox.put(pb.WorkerMessage(hello=hello))
        challenge = await self._expect(call, "challenge")
        self._nonce = challenge.challenge.nonce
        self.coordinator_id = challenge.challenge.coordinator_id
        self._sent.clear()
        self._readvertises = False
        self._advertised_at = time.monotonic()  # the registration is an advert too
        await outbox.put(self._register())
        registered = (await self._expect(call, "registered")).registered
        log.info("registered with %s as %s", self._config.coordinator, registered.node_id)
        self.state = "connected"
        self.connected_since = time.monotonic()
        if self._on_registered:
            self._on_registered(registered.node_id)
        host = self._config.coordinator.rpartition(":")[0]
        self.on_siblings([f"{host}:{port}" for port in registered.sibling_ports])
        return max(0.2, registered.heartbeat_interval_ms / 1000)

    def _register(self, advert: Advert | None = None) -> pb.WorkerMessage:
        advert = advert or self._make_advert(self.coordinator_id)
        self._sent.append(advert)
        advert_bytes, signature = sign_registration(self._identity, self._nonce, advert)
        return pb.WorkerMessage(register=pb.Register(advert=advert_bytes, signature=signature))

    def readvertise(self) -> None:
        """Send the node's advert again if its offers to this coordinator moved, signed over
        this session's challenge: the coordinator prices jobs from it on. Only to one that
        takes it (an older coordinator would ignore it and go on pricing the first)."""
        if self._outbox is None or self.state != "connected" or not self._readvertises:
            return
        wait = self._advertised_at + ADVERT_GAP_S - time.monotonic()
        if wait > 0:  # paced: the coordinator takes one advert per gap, the latest goes then
            if self._pending is None:
                self._pending = asyncio.get_running_loop().call_later(wait, self._send_paced)
            return
        advert = self._make_advert(self.coordinator_id)
        if not self._sent or advert.models != self._sent[-1].models:
            self._advertised_at = time.monotonic()
            self._outbox.put_nowait(self._register(advert))

    def _send_paced(self) -> None:
        self._pending = None
        self.readvertise()

    async def board(self) -> DemandBoard | None:
        """This coordinator's demand board, verified; None while not connected or from a
        coordinator that sends none."""
        if self._outbox is None or self.state != "connected":
            return None
        board = await self._requests.board(self._outbox.put_nowait, self.coordinator_id)
        if board is not None and not self._readvertises:
            self._readvertises = True  # and a change made while it registered goes out now
            self.readvertise()
        return board

    def _advert_for(self, issued_at_ms: int) -> Advert | None:
        """The advert a job names (the one in force when it was routed, or the one before);
        an older coordinator names none: it prices by the only advert it took."""
        if not issued_at_ms:
            return self._sent[-1] if self._sent else None
        return next((a for a in self._sent if a.issued_at_ms == issued_at_ms), None)

    async def _expect(self, call: Call, kind: str) -> pb.CoordinatorMessage:
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ProtocolMismatch(
                    f"coordinator {self._config.coordinator} refused this node's protocol: "
                    f"{details}. Upgrade agora on this node (it speaks {PROTOCOL_VERSION})."
                ) from exc
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                raise RegistrationRefused(
                    f"coordinator {self._config.coordinator} refused registration: {details}"
                ) from exc
            raise
        if msg is grpc.aio.EOF or not isinstance(msg, pb.CoordinatorMessage):
            raise ConnectionError("coordinator closed the session during the handshake")
        if msg.WhichOneof("kind") != kind:
            raise ConnectionError(f"expected {kind}, got {msg.WhichOneof('kind')}")
        return msg

    async def _heartbeats(self, outbox: Outbox, interval: float) -> None:
        """One right after registering (live load from the start), then every interval or
        whenever `notify()` asks."""
        while True:
            self._beat_now.clear()
            beat = await self._heartbeat() if self._heartbeat is not None else pb.Heartbeat()
            for load in beat.loads:  # the engine's slots are shared by all coordinators
                load.jobs = self.jobs_for(load.model)
                load.jobs_elsewhere = self.jobs_elsewhere(load.model)
            beat.sent_at_ms = time.time_ns() // 1_000_000
            await outbox.put(pb.WorkerMessage(heartbeat=beat))
            sent = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), timeout=interval)
            await asyncio.sleep(max(0.0, sent + MIN_BEAT_GAP_S - time.monotonic()))

    async def _drain_when(self, stop: asyncio.Event, outbox: Outbox) -> None:
        await stop.wait()
        self.state = "draining"
        await outbox.put(pb.WorkerMessage(drain=pb.Drain(reason="node shutting down")))
        if self._jobs:
            log.info("draining: waiting for %d running job(s)", len(self._jobs))
            _done, pending = await asyncio.wait(
                list(self._jobs.values()), timeout=self._config.drain_timeout_s
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await outbox.put(None)  # half-close: the coordinator then ends the stream

    async def _serve(self, call: Call, outbox: Outbox) -> None:
        """Read coordinator messages until the coordinator ends the stream."""
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF or not isinstance(msg, pb.CoordinatorMessage):
                if self.state == "draining":
                    return
                raise ConnectionError("coordinator ended the session")
            kind = msg.WhichOneof("kind")
            if kind == "job":
                self._start_job(msg.job, outbox)
            elif kind == "cancel":
                rid = msg.cancel.request_id
                stop = self._stops.get(rid)
                if msg.cancel.sign and stop is not None:
                    stop.set()  # the job ends now and signs for what it generated
                elif task := self._jobs.get(rid):
                    task.cancel()
            elif kind == "adapter_part":
                self._requests.adapter_part(msg.adapter_part)
            elif kind == "board":
                self._requests.board_came(msg.board)

    def _start_job(self, job: pb.Job, outbox: Outbox) -> None:
        if self.state == "draining":
            refusal = Failed(503, "node is draining", "worker_draining", retryable=True)
            outbox.put_nowait(pb.WorkerMessage(job_event=job_event(job.request_id, refusal)))
            return
        advert = self._advert_for(job.advert_issued_at_ms)
        if advert is None:  # not an advert of this session (or long replaced): no price
            refusal = Failed(409, "the job names an advert this node no longer offers",
                             "stale_advert", retryable=True, overloaded=True)  # fmt: skip
            outbox.put_nowait(pb.WorkerMessage(job_event=job_event(job.request_id, refusal)))
            return
        spec = JobSpec(
            request_id=job.request_id,
            model=job.model,
            endpoint=_ENDPOINTS.get(job.endpoint, CHAT),
            body=_json_object(job.body),
            nonce=job.nonce,
            adapter=job.adapter_sha256,
            fetch_adapter=functools.partial(self._requests.adapter, outbox.put_nowait),
            batch=job.batch,
            offer=advert.offer(job.model),  # None: the runner says it serves no such model
        )
        task = asyncio.create_task(self._run_job(spec, outbox))
        self._jobs[spec.request_id] = task
        self._stops[spec.request_id] = spec.stop
        self._job_models[spec.request_id] = spec.model
        task.add_done_callback(lambda _t: self._job_ended(spec.request_id))
        self.on_jobs_changed()

    def _job_ended(self, request_id: str) -> None:
        self._jobs.pop(request_id, None)
        self._stops.pop(request_id, None)
        self._job_models.pop(request_id, None)
        self.on_jobs_changed()

    async def _run_job(self, spec: JobSpec, outbox: Outbox) -> None:
        rid = spec.request_id
        try:
            async for out in self._runner.run(spec):
                if isinstance(out, FramesWaiting):
                    outbox.put_nowait(out.buffer)  # taken when the stream is ready
                    continue
                if isinstance(out, Failed):
                    log.warning("job %s failed: %s %s: %s", rid, out.http_status, out.type,
                                out.message[:300])  # fmt: skip
                await outbox.put(pb.WorkerMessage(job_event=job_event(rid, out)))
        except asyncio.CancelledError:
            log.info("job %s cancelled", rid)
            raise
        except Exception as exc:  # a job must always end with an event, never silently
            log.exception("job %s failed", rid)
            failed = Failed(500, f"worker error: {exc}", "worker_error", retryable=False)
            await outbox.put(pb.WorkerMessage(job_event=job_event(rid, failed)))


def _json_object(data: bytes) -> dict[str, Any]:
    value = msgspec.json.decode(data)
    if not isinstance(value, dict):
        raise ValueError("job body must be a JSON object")
    return value


def _describe(exc: grpc.aio.AioRpcError) -> str:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return "unreachable (is it running, and is the address right?)"
    return f"{exc.code().name}: {exc.details()}"
