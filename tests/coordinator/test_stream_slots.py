"""The SSE response writes the end of a stream and its terminator together, and runs the
event generator's cleanup (which frees the worker slot) before it returns."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pytest

from coordinator.api.sse import EventStreamResponse


async def test_event_stream_response_runs_the_generators_cleanup_before_returning() -> None:
    cleaned: list[bool] = []

    async def events() -> AsyncGenerator[tuple[bytes, bool]]:
        try:
            yield b"data: a\n\n", False
            yield b"data: [DONE]\n\n", True
            yield b"never sent", False
        finally:
            cleaned.append(True)

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await EventStreamResponse(events(), headers={}).stream_response(send)
    assert cleaned == [True]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True, False]  # end + terminator in one write
    assert b"never sent" not in b"".join(m["body"] for m in bodies)


async def test_an_event_stream_abandoned_before_it_began_still_releases() -> None:
    started: list[bool] = []
    closed: list[bool] = []

    async def events() -> AsyncGenerator[tuple[bytes, bool]]:
        started.append(True)
        yield b"data: [DONE]\n\n", True

    async def send(_message: Any) -> None:
        raise OSError("the client went away before the first byte")

    response = EventStreamResponse(events(), headers={}, on_close=lambda: closed.append(True))
    with pytest.raises(OSError, match="went away"):
        await response.stream_response(send)
    assert started == []  # the generator never ran, so its own cleanup never would
    assert closed == [True]
