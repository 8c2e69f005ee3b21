"""Server-sent events with as few socket writes as possible.

The body iterator yields (bytes, last). Everything that became ready together is one write, and
the final events, `data: [DONE]` and the chunked-encoding terminator leave in one write too
(Starlette's StreamingResponse would spend an extra write on an empty final frame).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Send


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[tuple[bytes, bool]],
        headers: Mapping[str, str],
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__((), headers={**headers, "Cache-Control": "no-cache"})
        self._events = events
        # called once the response is over, however it ended: a generator that never started
        # runs no cleanup of its own when closed
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})  # fmt: skip
            async for body, last in self._events:
                await send({"type": "http.response.body", "body": body, "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()  # run its cleanup now, not whenever it is collected
            self._on_close()
