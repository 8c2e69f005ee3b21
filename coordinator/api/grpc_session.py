"""The workers' gRPC endpoint: challenge-response registration, then the job stream."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from coordinator.errors import CoordinatorError
from coordinator.services.adapters import AdapterLibrary
from coordinator.services.registry import Registry, WorkerConnection
from coordinator.services.request_path.link import SessionLink
from protocol.advert import PROTOCOL_VERSION, Advert, verify_registration
from protocol.errors import ProtocolError
from protocol.identity import Identity, node_id_from_public_key
from protocol.market import RelayedRegistration
from protocol.proto import session_pb2 as pb
from protocol.proto import session_pb2_grpc as pb_grpc

log = logging.getLogger("agora.coordinator.workers")

ADVERT_MAX_AGE_MS = 5 * 60 * 1000  # an advert signed longer ago than this is stale
MIN_GAP_S = 0.25  # between two adverts, or two boards, a session is given


@dataclass
class _Session:
    """One live worker session: the key and challenge it registered with, its connection,
    and when it last advertised again or asked for the board (each at most every
    MIN_GAP_S: neither may keep the coordinator busy)."""

    public_key: bytes
    nonce: bytes
    conn: WorkerConnection
    link: SessionLink
    advertised_at: float = float("-inf")
    board: tuple[float, bytes] = (float("-inf"), b"")


class WorkerSessionService(pb_grpc.WorkerSessionServicer):
    def __init__(
        self,
        registry: Registry,
        identity: Identity,
        heartbeat_interval_s: float,
        sibling_ports: tuple[int, ...] = (),
        adapters: AdapterLibrary | None = None,
        board: Callable[[], bytes] | None = None,
    ) -> None:
        self._adapters = adapters  # archives workers may ask for by hash
        self._board = board  # this coordinator's signed demand board, for nodes pricing by it
        self._registry = registry
        self._identity = identity
        self._heartbeat_ms = int(heartbeat_interval_s * 1000)
        self._sibling_ports = sibling_ports  # this coordinator's other processes (cluster)
        self._sending: set[asyncio.Task[None]] = set()  # adapters on their way to workers

    async def Connect(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.WorkerMessage],
        context: grpc.aio.ServicerContext[pb.WorkerMessage, pb.CoordinatorMessage],
    ) -> AsyncIterator[pb.CoordinatorMessage]:
        requests = aiter(request_iterator)
        hello = await anext(requests, None)
        public_key = await self._check_hello(hello, context)
        nonce = os.urandom(32)
        yield pb.CoordinatorMessage(
            challenge=pb.Challenge(nonce=nonce, coordinator_id=self._identity.node_id)
        )
        register = await anext(requests, None)
        advert = await self._check_registration(public_key, nonce, register, context)
        assert register is not None
        proof = RelayedRegistration(register.register.advert, nonce, register.register.signature)
        link = SessionLink()
        conn = WorkerConnection(advert.node_id, advert, link, registration=proof)
        self._registry.add(conn)
        log.info("worker %s registered: %s", conn.node_id, [m.name for m in advert.models])
        session = _Session(public_key, nonce, conn, link)
        reader = asyncio.create_task(self._read_loop(session, requests))
        try:
            yield pb.CoordinatorMessage(
                registered=pb.Registered(
                    node_id=conn.node_id,
                    heartbeat_interval_ms=self._heartbeat_ms,
                    sibling_ports=self._sibling_ports,
                )
            )
            while (msg := await link.outbox.get()) is not None:
                yield msg
        finally:
            reader.cancel()
            self._registry.remove(conn)
            conn.close("worker session ended")
            log.info("worker %s disconnected", conn.node_id)

    async def _check_hello(
        self,
        hello: pb.WorkerMessage | None,
        context: grpc.aio.ServicerContext[pb.WorkerMessage, pb.CoordinatorMessage],
    ) -> bytes:
        if hello is None or hello.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected Hello first")
        assert hello is not None
        if hello.hello.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol {hello.hello.protocol_version!r} not supported; "
                f"this coordinator speaks {PROTOCOL_VERSION}",
            )
        try:
            node_id_from_public_key(hello.hello.public_key)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return hello.hello.public_key

    async def _check_registration(
        self,
        public_key: bytes,
        nonce: bytes,
        reg: pb.WorkerMessage | None,
        context: grpc.aio.ServicerContext[pb.WorkerMessage, pb.CoordinatorMessage],
    ) -> Advert:
        if reg is None or reg.WhichOneof("kind") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected Register")
        assert reg is not None
        try:
            advert = verify_registration(
                public_key, nonce, reg.register.advert, reg.register.signature
            )
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"registration refused: {exc}")
        age_ms = abs(time.time_ns() // 1_000_000 - advert.issued_at_ms)
        if age_ms > ADVERT_MAX_AGE_MS:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"advert is stale ({age_ms // 1000} s old); check the node's clock",
            )
        return advert

    async def _read_loop(
        self, session: _Session, requests: AsyncIterator[pb.WorkerMessage]
    ) -> None:
        conn, link = session.conn, session.link
        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if kind == "job_events":
                    for event in msg.job_events.events:
                        link.deliver(event)
                elif kind == "job_event":
                    link.deliver(msg.job_event)
                elif kind == "heartbeat":
                    conn.heartbeat(msg.heartbeat)
                elif kind == "adapter_wanted":
                    task = asyncio.create_task(self._send_adapter(link, msg.adapter_wanted.sha256))
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)
                elif kind == "drain":
                    conn.draining = True
                    log.info("worker %s draining: %s", conn.node_id, msg.drain.reason)
                elif kind == "register":
                    self._readvertised(session, msg.register)
                elif kind == "board_wanted":
                    link.outbox.put_nowait(
                        pb.CoordinatorMessage(board=pb.MarketBoard(sealed=self._board_for(session)))
                    )
        finally:
            link.outbox.put_nowait(None)  # ends the response stream

    def _readvertised(self, session: _Session, register: pb.Register) -> None:
        """A newer advert on a live session (the node's asks moved): signed over the same
        challenge, by the same key, newer than the one in force; anything else is ignored."""
        conn = session.conn
        now = time.monotonic()
        if now - session.advertised_at < MIN_GAP_S:
            log.warning("worker %s advertises too often: an advert ignored", conn.node_id)
            return
        session.advertised_at = now
        try:
            advert = verify_registration(
                session.public_key, session.nonce, register.advert, register.signature
            )
        except ProtocolError as exc:
            log.warning("worker %s sent an advert that does not verify: %s", conn.node_id, exc)
            return
        if advert.issued_at_ms <= conn.advert.issued_at_ms:
            log.warning("worker %s sent an advert older than the one in force", conn.node_id)
            return
        if abs(time.time_ns() // 1_000_000 - advert.issued_at_ms) > ADVERT_MAX_AGE_MS:
            log.warning("worker %s sent an advert dated far from now", conn.node_id)
            return
        if {m.name for m in advert.models} != {m.name for m in conn.advert.models}:
            log.warning("worker %s advertised other models mid-session: ignored (a node that "
                        "changes its models registers again)", conn.node_id)  # fmt: skip
            return
        proof = RelayedRegistration(register.advert, session.nonce, register.signature)
        self._registry.readvertise(conn, advert, proof)
        log.info("worker %s advertised again: %s", conn.node_id,
                 [(m.name, m.price_prompt_per_mtok, m.price_completion_per_mtok)
                  for m in advert.models])  # fmt: skip

    def _board_for(self, session: _Session) -> bytes:
        """The signed board (the same bytes again when asked within MIN_GAP_S)."""
        at, sealed = session.board
        if self._board is not None and time.monotonic() - at >= MIN_GAP_S:
            sealed = self._board()
            session.board = (time.monotonic(), sealed)
        return sealed

    async def _send_adapter(self, link: SessionLink, sha256: str) -> None:
        """An adapter's archive down the worker's own session, in pieces (or why not)."""
        if self._adapters is None:
            link.outbox.put_nowait(
                pb.CoordinatorMessage(
                    adapter_part=pb.AdapterPart(sha256=sha256, error="no adapters here", last=True)
                )
            )
            return
        try:
            async for piece in self._adapters.parts(sha256):
                link.outbox.put_nowait(
                    pb.CoordinatorMessage(adapter_part=pb.AdapterPart(sha256=sha256, data=piece))
                )
        except CoordinatorError as exc:
            part = pb.AdapterPart(sha256=sha256, error=exc.message, last=True)
        except Exception:  # the worker must hear of it, not wait out its timeout
            log.exception("sending adapter %s failed", sha256)
            part = pb.AdapterPart(
                sha256=sha256, error="the coordinator could not read it", last=True
            )
        else:
            part = pb.AdapterPart(sha256=sha256, last=True)
        link.outbox.put_nowait(pb.CoordinatorMessage(adapter_part=part))
