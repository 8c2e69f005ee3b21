"""Server-sent events with as few socket writes as possible.

The body iterator yields (bytes, last). Everything that became ready together is one write, and
the final events, `data: [DONE]` and the chunked-encoding terminator leave in one write too
(Starlette's StreamingResponse would spend an extra write on an empty final frame).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Send


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncGenerator[tuple[bytes, bool]], headers: Mapping[str, str]
    ) -> None:
        super().__init__((), headers={**headers, "Cache-Control": "no-cache"})
        self._events = events

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for body, last in self._events:
                await send({"type": "http.response.body", "body": body, "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._events.aclose()  # run its cleanup now, not whenever it is collected
