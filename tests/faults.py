"""A fault-injecting engine for coordinator tests: a real HTTP proxy in front of the real vLLM
engine that, on cue, delays its first byte, paces its stream events, answers with an error
status, stalls after N stream events, or cuts the connection after N events. Everything else
is the engine's own answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class Cut(Exception):
    """Raised inside the response to drop the connection mid-stream."""


def _inflated(payload: bytes, extra: int) -> bytes:
    """An engine over-reporting usage: `extra` more prompt and completion tokens."""
    prefix = b"data: " if payload.startswith(b"data: ") else b""
    try:
        value = json.loads(payload[len(prefix) :])
    except ValueError:
        return payload  # [DONE]
    usage = value.get("usage") if isinstance(value, dict) else None
    if not usage:
        return payload
    usage["prompt_tokens"] += extra
    usage["completion_tokens"] += extra
    usage["total_tokens"] += 2 * extra
    return prefix + json.dumps(value).encode()


class FaultProxy:
    def __init__(self, upstream_base_url: str) -> None:
        self.upstream = upstream_base_url.rstrip("/").removesuffix("/v1")
        self.first_byte_delay_s = 0.0  # hold the response this long before its first byte
        self.event_delay_s = 0.0  # pause after each stream event (a slower engine)
        self.fail_status: int | None = None  # answer every request with this HTTP status
        self.fail_jobs_status: int | None = None  # … only completions (probes still pass)
        self.stall_after_events: int | None = None  # stop sending (connection open) after N
        self.cut_after_events: int | None = None  # drop the connection after N events
        self.inflate_usage = 0  # add this to the engine's reported prompt and completion tokens
        self.requests = 0  # POSTs (jobs) received
        self.bodies: list[bytes] = []  # every POST's body: what the engine was asked
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def reset(self) -> None:
        self.first_byte_delay_s = 0.0
        self.event_delay_s = 0.0
        self.fail_status = None
        self.fail_jobs_status = None
        self.stall_after_events = None
        self.cut_after_events = None
        self.inflate_usage = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _proxy(self, request: Request) -> Response:
        if request.method == "POST":
            self.requests += 1  # completions only, not the worker's health and metrics probes
        body = await request.body()
        if request.method == "POST":
            self.bodies.append(body)
        failing = self.fail_jobs_status if request.method == "POST" else None
        if self.fail_status is not None or failing is not None:
            error = {"error": {"message": "injected failure", "type": "server_error"}}
            return JSONResponse(error, status_code=self.fail_status or failing or 500)
        url = f"{self.upstream}{request.url.path}"
        client = httpx.AsyncClient(timeout=None)
        upstream = await client.send(
            client.build_request(request.method, url, content=body, headers={
                "content-type": request.headers.get("content-type", "application/json")
            }),
            stream=True,
        )  # fmt: skip
        delay, stall, cut = self.first_byte_delay_s, self.stall_after_events, self.cut_after_events
        pace, inflate = self.event_delay_s, self.inflate_usage

        async def relay() -> AsyncIterator[bytes]:
            try:
                if delay:
                    await asyncio.sleep(delay)
                events, pending = 0, b""
                async for data in upstream.aiter_raw():
                    pending += data
                    *complete, pending = pending.split(b"\n\n")
                    for event in complete:  # one SSE event at a time, so faults hit exactly
                        yield (_inflated(event, inflate) if inflate else event) + b"\n\n"
                        events += 1
                        if pace:
                            await asyncio.sleep(pace)
                        if stall is not None and events >= stall:
                            # the engine stops (its request is aborted, so it does not share
                            # the batch with the continuation) but the connection stays open
                            await upstream.aclose()
                            await asyncio.sleep(3600)
                        if cut is not None and events >= cut:
                            raise Cut
                if pending:  # a plain JSON answer
                    yield _inflated(pending, inflate) if inflate else pending
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(
            relay(),
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
        )

    def start(self) -> FaultProxy:
        app = Starlette(routes=[Route("/{path:path}", self._proxy, methods=["GET", "POST"])])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="critical", loop="asyncio"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fault proxy did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=10)
