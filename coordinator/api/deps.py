"""Typed dependencies shared by the routes."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from coordinator.api.browser_sessions import COOKIE, BrowserSession, BrowserSessions
from coordinator.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
)
from coordinator.services.accounts import Accounts, Principal
from coordinator.services.gateway import Gateway
from coordinator.services.payouts import Payouts
from coordinator.services.settlement import Settlement


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


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
GatewayDep = Annotated[Gateway, Depends(get_gateway)]
SettlementDep = Annotated[Settlement, Depends(get_settlement)]
AccountsDep = Annotated[Accounts, Depends(get_accounts)]


async def current_principal(
    accounts: AccountsDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    return await accounts.authenticate(authorization)


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def browser_session(request: Request) -> BrowserSession | None:
    sessions: BrowserSessions = request.app.state.sessions
    return sessions.get(request.cookies.get(COOKIE))


async def require_admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """The admin token as a bearer token; or, for reading only, the operator's dashboard
    session (a cookie never authorizes a change, so a forged cross-site form can do nothing)."""
    token: str = request.app.state.admin_token
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(secret.strip(), token):
        return
    session = browser_session(request)
    if request.method == "GET" and session is not None and session.role == "operator":
        return
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
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


BodyDep = Annotated[dict[str, Any], Depends(json_body)]
