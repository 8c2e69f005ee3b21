"""Workers register by signing the coordinator's challenge; anything else is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from agora.stack import CoordinatorHandle
from protocol.advert import PROTOCOL_VERSION, Advert, ModelOffer, sign_registration
from protocol.identity import Identity
from protocol.proto import session_pb2 as pb
from protocol.proto import session_pb2_grpc as pb_grpc
from worker_node import session as worker_session
from worker_node.asks import Asks
from worker_node.engine_client import EngineClients
from worker_node.errors import ProtocolMismatch
from worker_node.jobs import JobRunner
from worker_node.session import SessionConfig, WorkerSession


def _advert(identity: Identity, issued_at_ms: int | None = None) -> Advert:
    return Advert(
        node_id=identity.node_id,
        issued_at_ms=issued_at_ms or time.time_ns() // 1_000_000,
        models=(ModelOffer("fake-model", 1, 1, 1),),
    )


def _unchanged(data: bytes, sig: bytes) -> tuple[bytes, bytes]:
    return data, sig


async def _register(
    target: str,
    hello_key: Identity,
    sign: Identity,
    *,
    version: str = PROTOCOL_VERSION,
    tamper: Callable[[bytes, bytes], tuple[bytes, bytes]] = _unchanged,
    **advert_kw: int,
) -> pb.CoordinatorMessage:
    """Run the handshake; `sign` signs the challenge (the right key or an impostor's) and
    `tamper` may change the advert bytes or signature on the way."""
    outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.WorkerMessage]:
        while (msg := await outbox.get()) is not None:
            yield msg

    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.WorkerSessionStub(channel).Connect(requests())
        hello = pb.Hello(public_key=hello_key.public_key, protocol_version=version)
        await outbox.put(pb.WorkerMessage(hello=hello))
        challenge = await call.read()
        assert isinstance(challenge, pb.CoordinatorMessage)
        data, sig = sign_registration(
            sign, challenge.challenge.nonce, _advert(hello_key, **advert_kw)
        )
        data, sig = tamper(data, sig)
        await outbox.put(pb.WorkerMessage(register=pb.Register(advert=data, signature=sig)))
        try:
            reply = await call.read()
        finally:
            await outbox.put(None)
        assert isinstance(reply, pb.CoordinatorMessage)
        call.cancel()
        return reply


async def test_valid_signature_registers(bare_coordinator: CoordinatorHandle) -> None:
    identity = Identity.generate()
    reply = await _register(bare_coordinator.grpc_target, identity, identity)
    assert reply.registered.node_id == identity.node_id
    assert reply.registered.heartbeat_interval_ms > 0


async def test_bad_challenge_signature_is_unauthenticated(
    bare_coordinator: CoordinatorHandle,
) -> None:
    worker, impostor = Identity.generate(), Identity.generate()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _register(bare_coordinator.grpc_target, worker, impostor)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "registration refused" in (info.value.details() or "")


async def test_stale_advert_is_unauthenticated(bare_coordinator: CoordinatorHandle) -> None:
    identity = Identity.generate()
    an_hour_ago = time.time_ns() // 1_000_000 - 3_600_000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _register(bare_coordinator.grpc_target, identity, identity, issued_at_ms=an_hour_ago)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "stale" in (info.value.details() or "")


async def test_unsigned_advert_is_unauthenticated(bare_coordinator: CoordinatorHandle) -> None:
    identity = Identity.generate()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _register(
            bare_coordinator.grpc_target, identity, identity, tamper=lambda d, _s: (d, b"")
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_forged_advert_is_unauthenticated(bare_coordinator: CoordinatorHandle) -> None:
    """A signed advert whose price was changed after signing."""
    identity = Identity.generate()

    def cheaper(data: bytes, sig: bytes) -> tuple[bytes, bytes]:
        return data.replace(b'"price_prompt_per_mtok":1', b'"price_prompt_per_mtok":0'), sig

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _register(bare_coordinator.grpc_target, identity, identity, tamper=cheaper)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_protocol_version_is_failed_precondition(
    bare_coordinator: CoordinatorHandle,
) -> None:
    identity = Identity.generate()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _register(bare_coordinator.grpc_target, identity, identity, version="agora.v0")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "agora.v0" in details
    assert PROTOCOL_VERSION in details


async def test_worker_session_turns_a_version_mismatch_into_a_clear_error(
    bare_coordinator: CoordinatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older node (speaking agora.v0) is told to upgrade, and does not retry forever."""
    monkeypatch.setattr(worker_session, "PROTOCOL_VERSION", "agora.v0")
    identity = Identity.generate()
    async with EngineClients(1) as http:
        runner = JobRunner(identity, {}, Asks(), http)
        session = WorkerSession(
            identity,
            lambda _coordinator: _advert(identity),
            runner,
            SessionConfig(bare_coordinator.grpc_target),
        )
        with pytest.raises(ProtocolMismatch) as info:
            await asyncio.wait_for(session.run(asyncio.Event()), timeout=30)
    message = str(info.value)
    assert "agora.v0" in message
    assert "Upgrade agora on this node" in message
