"""Every HTTP request gets an id: in the logs (JSON field `request_id`), in the response
(`X-Agora-Request-Id`, also on errors), and as the id of the job and its receipt. Requests
whose headers together exceed the limit are answered 431 here, before any route runs."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.api.errors import from_coordinator_error
from coordinator.errors import HeadersTooLarge
from coordinator.observability import request_id_var


class RequestIdMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware): no extra task or body copy per request."""

    def __init__(self, app: ASGIApp, max_header_bytes: int = 32 * 1024) -> None:
        self.app = app
        self._max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        token = request_id_var.set(request_id)
        header = (b"x-agora-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self._max_header_bytes:
                too_large = HeadersTooLarge(
                    f"Request headers total {size} bytes; the limit is {self._max_header_bytes}."
                )
                await from_coordinator_error(too_large)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
