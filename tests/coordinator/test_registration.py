"""Workers register by signing the coordinator's challenge; anything else is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from agora.stack import CoordinatorHandle
from protocol.advert import Advert, ModelOffer, sign_registration
from protocol.identity import Identity
from protocol.proto import session_pb2 as pb
from protocol.proto import session_pb2_grpc as pb_grpc


def _advert(identity: Identity, issued_at_ms: int | None = None) -> Advert:
    return Advert(
        node_id=identity.node_id,
        issued_at_ms=issued_at_ms or time.time_ns() // 1_000_000,
        models=(ModelOffer("fake-model", 1, 1, 1),),
    )


async def _register(
    target: str, hello_key: Identity, sign: Identity, **advert_kw: int
) -> pb.CoordinatorMessage:
    """Run the handshake; `sign` signs the challenge (the right key or an impostor's)."""
    outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.WorkerMessage]:
        while (msg := await outbox.get()) is not None:
            yield msg

    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.WorkerSessionStub(channel).Connect(requests())
        hello = pb.Hello(public_key=hello_key.public_key, protocol_version="agora.v1")
        await outbox.put(pb.WorkerMessage(hello=hello))
        challenge = await call.read()
        assert isinstance(challenge, pb.CoordinatorMessage)
        data, sig = sign_registration(
            sign, challenge.challenge.nonce, _advert(hello_key, **advert_kw)
        )
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
