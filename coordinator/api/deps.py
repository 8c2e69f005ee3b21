"""Typed dependencies shared by the routes."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, TypeVar

import msgspec
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from coordinator.api.browser_sessions import COOKIE, BrowserSession, BrowserSessions
from coordinator.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
)
from coordinator.services.accounts import Accounts, Principal
from coordinator.services.overview import Overview
from coordinator.services.payouts import Payouts
from coordinator.services.request_path.path import RequestPath
from coordinator.services.settlement import Settlement

M = TypeVar("M", bound=BaseModel)


async def get_request_path(request: Request) -> RequestPath:
    path: RequestPath = request.app.state.request_path
    return path


async def get_overview(request: Request) -> Overview:
    overview: Overview = request.app.state.overview
    return overview


async def get_accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


async def get_settlement(request: Request) -> Settlement:
    settlement: Settlement = request.app.state.settlement
    return settlement


async def get_payouts(request: Request) -> Payouts:
    payouts: Payouts = request.app.state.payouts
    return payouts


PayoutsDep = Annotated[Payouts, Depends(get_payouts)]
RequestPathDep = Annotated[RequestPath, Depends(get_request_path)]
OverviewDep = Annotated[Overview, Depends(get_overview)]
SettlementDep = Annotated[Settlement, Depends(get_settlement)]
AccountsDep = Annotated[Accounts, Depends(get_accounts)]


# the two bearer schemes, for the OpenAPI document; the header itself is read below, so a
# malformed one gets our own message rather than FastAPI's
API_KEY = HTTPBearer(
    auto_error=False, scheme_name="ApiKey", description="An Agora API key (sk-agora-…)."
)
ADMIN_TOKEN = HTTPBearer(
    auto_error=False, scheme_name="AdminToken",
    description="The operator's admin token (the coordinator prints where its file is).",
)  # fmt: skip
ApiKeyScheme = Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY)]
AdminTokenScheme = Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_TOKEN)]


async def current_principal(
    request: Request, accounts: AccountsDep, _scheme: ApiKeyScheme
) -> Principal:
    return await accounts.authenticate(request.headers.get("authorization"))


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def browser_session(request: Request) -> BrowserSession | None:
    sessions: BrowserSessions = request.app.state.sessions
    return sessions.get(request.cookies.get(COOKIE))


async def require_admin(request: Request, _scheme: AdminTokenScheme) -> None:
    """The admin token as a bearer token; or, for reading only, the operator's dashboard
    session (a cookie never authorizes a change, so a forged cross-site form can do nothing)."""
    token: str = request.app.state.admin_token
    authorization = request.headers.get("authorization")
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(
        secret.strip().encode(), token.encode()
    ):
        return
    session = browser_session(request)
    if request.method == "GET" and session is not None and session.role == "operator":
        return
    if not authorization and session is None:  # no credentials at all: who are you?
        raise AuthenticationFailed(
            "This endpoint needs the operator's admin token: send it as "
            "'Authorization: Bearer <token>'."
        )
    raise PermissionDenied("This endpoint needs the operator's admin token.")


async def current_provider(request: Request) -> str:
    """The node id of the provider signed in to this browser session."""
    session = browser_session(request)
    if session is None or session.role != "provider" or session.node_id is None:
        raise AuthenticationFailed(
            "Sign in as a provider first: run `agora worker login` on your node and open the "
            "link it prints."
        )
    return session.node_id


ProviderDep = Annotated[str, Depends(current_provider)]


AdminDep = Annotated[None, Depends(require_admin)]


async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 in the OpenAI envelope."""
    limit: int = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    try:  # strict JSON: no NaN/Infinity, no lone surrogates, numbers in range
        value = msgspec.json.decode(bytes(raw))
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidRequest(f"We could not parse the JSON body of your request: {reason}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


BodyDep = Annotated[dict[str, Any], Depends(json_body)]


def validated(model: type[M], body: dict[str, Any]) -> M:
    """`body` as `model`, or a 400 naming the first bad parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}", param=param) from exc


def admin_body(model: type[M]) -> Any:
    """A JSON body validated as `model`, read only once the admin token checked out: an
    unauthenticated caller gets 401/403 whatever it sent, and learns nothing of the schema."""

    async def parse(_admin: AdminDep, body: BodyDep) -> M:
        return validated(model, body)

    return Depends(parse)
