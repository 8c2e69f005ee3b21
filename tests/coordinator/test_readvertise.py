"""A live worker session advertises again (its asks moved): the coordinator routes at the new
prices at once; it ignores an advert older than the one in force, one not signed by the node,
one dated far from now, one of other models and one sent too soon after the last; and it
sends its signed demand board to a node that asks for it (what a node pricing itself reads)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agora.stack import CoordinatorHandle
from coordinator.api.grpc_session import MIN_GAP_S
from protocol.advert import PROTOCOL_VERSION, Advert, ModelOffer, sign_registration
from protocol.identity import Identity
from protocol.market import DemandBoard
from protocol.proto import session_pb2 as pb
from protocol.proto import session_pb2_grpc as pb_grpc

MODEL = "readvertised-model"


class Session:
    """A hand-driven worker session over real gRPC."""

    def __init__(self, channel: grpc.aio.Channel, identity: Identity) -> None:
        self.identity = identity
        self.outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()
        self.call = pb_grpc.WorkerSessionStub(channel).Connect(self._requests())
        self.nonce = b""
        self.coordinator_id = ""

    async def _requests(self) -> AsyncIterator[pb.WorkerMessage]:
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def register(self, prices: tuple[int, int]) -> int:
        hello = pb.Hello(public_key=self.identity.public_key, protocol_version=PROTOCOL_VERSION)
        await self.outbox.put(pb.WorkerMessage(hello=hello))
        challenge = await self.call.read()
        assert isinstance(challenge, pb.CoordinatorMessage)
        self.nonce, self.coordinator_id = (challenge.challenge.nonce,
                                           challenge.challenge.coordinator_id)  # fmt: skip
        issued = await self.advertise(prices)
        registered = await self.call.read()
        assert isinstance(registered, pb.CoordinatorMessage)
        assert registered.WhichOneof("kind") == "registered"
        return issued

    async def advertise(
        self, prices: tuple[int, int], issued_at_ms: int | None = None,
        signer: Identity | None = None, model: str = MODEL,
    ) -> int:  # fmt: skip
        issued = issued_at_ms or time.time_ns() // 1_000_000
        advert = Advert(self.identity.node_id, issued, (ModelOffer(model, 2, *prices),))
        data, sig = sign_registration(signer or self.identity, self.nonce, advert)
        await self.outbox.put(pb.WorkerMessage(register=pb.Register(advert=data, signature=sig)))
        return issued

    async def board(self) -> DemandBoard:
        """Ask for the demand board and read it (the coordinator handles a session's
        messages in order: everything sent before was handled by then)."""
        await self.outbox.put(pb.WorkerMessage(board_wanted=pb.BoardWanted()))
        reply = await self.call.read()
        assert isinstance(reply, pb.CoordinatorMessage)
        assert reply.WhichOneof("kind") == "board"
        return DemandBoard.open(reply.board.sealed, time.time_ns() // 1_000_000, 60_000)


def prices(coordinator: CoordinatorHandle, node_id: str) -> tuple[int, int] | None:
    with coordinator.admin() as admin:
        workers: list[dict[str, Any]] = admin.get("/workers").json()["workers"]
    for worker in workers:
        slot = worker["models"].get(MODEL)
        if worker["node_id"] == node_id and slot is not None:
            return slot["price_prompt_per_mtok"], slot["price_completion_per_mtok"]
    return None


async def eventually(check: Any, value: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := await asyncio.to_thread(check)) != value:
        assert time.monotonic() < deadline, f"{seen} != {value}"
        await asyncio.sleep(0.05)


async def test_a_newer_advert_reprices_a_live_session_and_older_or_forged_ones_do_not(
    bare_coordinator: CoordinatorHandle,
) -> None:
    worker = Identity.generate()
    async with grpc.aio.insecure_channel(bare_coordinator.grpc_target) as channel:
        session = Session(channel, worker)
        first = await session.register((100, 200))
        node = worker.node_id
        await eventually(lambda: prices(bare_coordinator, node), (100, 200))
        await session.advertise((300, 600), issued_at_ms=first + 1_000)
        await eventually(lambda: prices(bare_coordinator, node), (300, 600))
        ignored: list[dict[str, Any]] = [
            {"issued_at_ms": first + 500},  # older than the one in force
            {"issued_at_ms": first + 2_000, "signer": Identity.generate()},  # not its key
            {"issued_at_ms": first + 3_600_000},  # dated an hour ahead
            {"issued_at_ms": first + 2_000, "model": "another-model"},  # other models
        ]
        for advert in ignored:
            await asyncio.sleep(MIN_GAP_S)
            await session.advertise((1, 1), **advert)
            await session.board()  # answered after the advert before it was handled (in order)
            assert prices(bare_coordinator, node) == (300, 600), advert
        await asyncio.sleep(MIN_GAP_S)
        await session.advertise((2, 2), issued_at_ms=first + 4_000)
        await session.advertise((3, 3), issued_at_ms=first + 5_000)  # too soon after: ignored
        await session.board()
        assert prices(bare_coordinator, node) == (2, 2)
        await asyncio.sleep(MIN_GAP_S)
        await session.advertise((400, 800), issued_at_ms=first + 6_000)
        board = await session.board()
        assert prices(bare_coordinator, node) == (400, 800)
        assert board.coordinator_id == session.coordinator_id
        row = board.board["models"][MODEL]
        assert row["capacity"]["workers"] == 1  # (kept up to 5 s: its ask may be the last one)
        assert row["reserve"] == {"prompt": 0, "completion": 0}
        await session.outbox.put(None)
        session.call.cancel()
