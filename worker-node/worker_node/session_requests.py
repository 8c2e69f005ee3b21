"""What a session asks of its coordinator and waits for: registered LoRA adapters (by hash,
in pieces) and its demand board (for a node that prices itself). One request per thing asked,
however many wait for it; all of them fail when the session ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from protocol.errors import ProtocolError
from protocol.market import DemandBoard
from protocol.proto import session_pb2 as pb
from worker_node.errors import AdapterError

ADAPTER_FETCH_TIMEOUT_S = 120.0  # an adapter asked for must have come by then
MAX_ADAPTER_BYTES = 4 << 30  # an archive larger than this is refused while it arrives
BOARD_TIMEOUT_S = 5.0  # a board asked for comes at once or not at all (an older coordinator)
BOARD_MAX_AGE_MS = 60_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SessionRequests:
    def __init__(self) -> None:
        # adapters asked for: hash -> (the bytes so far, the whole archive)
        self._fetches: dict[str, tuple[bytearray, asyncio.Future[bytes]]] = {}
        self._board: asyncio.Future[bytes] | None = None

    # ---------------------------------------------------------------- adapters
    async def adapter(self, send: Callable[[pb.WorkerMessage], None], sha256: str) -> bytes:
        """An adapter's archive from the coordinator. The caller checks its hash."""
        pending = self._fetches.get(sha256)
        if pending is None:
            pending = self._fetches[sha256] = (
                bytearray(),
                asyncio.get_running_loop().create_future(),
            )
            send(pb.WorkerMessage(adapter_wanted=pb.AdapterWanted(sha256=sha256)))
        try:
            return await asyncio.wait_for(asyncio.shield(pending[1]), ADAPTER_FETCH_TIMEOUT_S)
        except TimeoutError as exc:
            self._fetches.pop(sha256, None)
            raise AdapterError(f"adapter {sha256[:12]} did not come from the coordinator") from exc

    def adapter_part(self, part: pb.AdapterPart) -> None:
        pending = self._fetches.get(part.sha256)
        if pending is None:
            return
        data, future = pending
        data += part.data
        error = part.error or ("too large" if len(data) > MAX_ADAPTER_BYTES else "")
        if error or part.last:
            del self._fetches[part.sha256]
            if future.done():
                return
            if error:
                future.set_exception(AdapterError(f"adapter {part.sha256[:12]}: {error}"))
                future.exception()  # retrieved here: a waiter that gave up never reads it
            else:
                future.set_result(bytes(data))

    # ---------------------------------------------------------------- the demand board
    async def board(
        self, send: Callable[[pb.WorkerMessage], None], coordinator_id: str
    ) -> DemandBoard | None:
        """The coordinator's demand board, checked against its key; None when it sent none
        in time or one that does not verify."""
        if self._board is None or self._board.done():
            self._board = asyncio.get_running_loop().create_future()
            send(pb.WorkerMessage(board_wanted=pb.BoardWanted()))
        try:
            sealed = await asyncio.wait_for(asyncio.shield(self._board), BOARD_TIMEOUT_S)
            board = DemandBoard.open(sealed, _now_ms(), BOARD_MAX_AGE_MS)
        except (TimeoutError, ProtocolError, ConnectionError):
            return None
        return board if board.coordinator_id == coordinator_id else None

    def board_came(self, board: pb.MarketBoard) -> None:
        if self._board is not None and not self._board.done():
            self._board.set_result(board.sealed)

    def fail(self, why: str) -> None:
        for sha256, (_data, future) in list(self._fetches.items()):
            if not future.done():
                future.set_exception(AdapterError(f"adapter {sha256[:12]}: {why}"))
                future.exception()
        self._fetches.clear()
        if self._board is not None and not self._board.done():
            self._board.set_exception(ConnectionError(why))
            self._board.exception()
