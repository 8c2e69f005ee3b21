"""One error shape for every HTTP failure: OpenAI's `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.errors import CoordinatorError

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorEnvelope(BaseModel):
    """Every error, whatever its status: OpenAI's shape, so the official SDKs raise the
    matching exception (503 and 429 also carry Retry-After)."""

    error: ErrorBody


_MEANINGS = {
    400: "Invalid request (the message names the parameter)",
    401: "No or malformed credentials",
    402: "Not enough credit for the worst-case cost of the request",
    403: "Credentials that do not allow this",
    404: "No such model, route, receipt or routing record",
    413: "Request body too large",
    429: "Rate limit (requests or tokens per minute) reached; see Retry-After",
    431: "Request headers too large",
    503: "No worker can take the request now; see Retry-After",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of routes that can answer with these error statuses."""
    return {s: {"model": ErrorEnvelope, "description": _MEANINGS[s]} for s in statuses}


def envelope(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | int | None = None,
    retry_after_s: int | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def from_coordinator_error(exc: CoordinatorError) -> JSONResponse:
    return envelope(
        exc.status,
        exc.message,
        exc.type,
        param=exc.param,
        code=exc.code,
        retry_after_s=exc.retry_after_s,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(CoordinatorError)
    async def _ours(_request: Request, exc: CoordinatorError) -> JSONResponse:
        return from_coordinator_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid"))
        return envelope(400, message, "invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return envelope(
            exc.status_code, str(exc.detail), _STATUS_TYPES.get(exc.status_code, "server_error")
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return envelope(500, "The server had an error processing your request.", "server_error")
