"""The dashboards in the browser: the operator's (admin token) and each provider's (its node
key). Pages are static files that read the same JSON APIs the CLI reads; assets, the charting
library included, are served from here (no CDN)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from coordinator.api.browser_sessions import COOKIE, BrowserSessions
from coordinator.api.deps import AdminDep, ProviderDep, browser_session
from coordinator.errors import AuthenticationFailed, InvalidRequest
from coordinator.services.overview import Overview
from protocol.errors import ProtocolError
from protocol.identity import public_key_from_node_id, verify_signature
from protocol.login import login_message

STATIC = Path(__file__).parent / "static"
router = APIRouter()


def _sessions(request: Request) -> BrowserSessions:
    sessions: BrowserSessions = request.app.state.sessions
    return sessions


def _overview(request: Request) -> Overview:
    overview: Overview = request.app.state.overview
    return overview


def _signed_in(response: Response, request: Request, token: str) -> Response:
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", path="/",
        secure=request.url.scheme == "https", max_age=12 * 3600,
    )  # fmt: skip
    return response


def _page(name: str) -> FileResponse:
    return FileResponse(
        STATIC / name, media_type="text/html", headers={"Cache-Control": "no-store"}
    )


# ---------------------------------------------------------------- operator
@router.get("/dashboard", include_in_schema=False)
async def operator_page(request: Request) -> Response:
    session = browser_session(request)
    if session is None or session.role != "operator":
        return RedirectResponse("/dashboard/login", status_code=303)
    return _page("operator.html")


@router.get("/dashboard/login", include_in_schema=False)
async def operator_login_page() -> Response:
    return _page("login.html")


@router.post("/dashboard/login", include_in_schema=False)
async def operator_login(request: Request, token: Annotated[str, Form()] = "") -> Response:
    if token.strip() != request.app.state.admin_token:
        page = (
            (STATIC / "login.html")
            .read_text()
            .replace(
                "<!--error-->", '<p class="error" role="alert">That is not the admin token.</p>'
            )
        )
        return HTMLResponse(page, status_code=401)
    session = _sessions(request).open("operator")
    return _signed_in(RedirectResponse("/dashboard", status_code=303), request, session)


@router.post("/dashboard/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    _sessions(request).close(request.cookies.get(COOKIE))
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/admin/v1/overview")
async def operator_overview(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """Everything on the operator dashboard (also what `agora status` prints)."""
    return await _overview(request).operator()


# ---------------------------------------------------------------- provider
class ProviderLogin(BaseModel):
    node_id: str
    challenge: str
    signature: str  # base64 Ed25519 signature of protocol.login.login_message(challenge)


@router.get("/provider", include_in_schema=False)
async def provider_page(request: Request) -> Response:
    session = browser_session(request)
    if session is None or session.role != "provider":
        return _page("provider_login.html")
    return _page("provider.html")


@router.get("/provider/v1/challenge")
async def provider_challenge(request: Request) -> dict[str, str]:
    return {"challenge": _sessions(request).challenge()}


@router.post("/provider/v1/login")
async def provider_login(body: ProviderLogin, request: Request) -> dict[str, str]:
    """A node proves it holds its key; it gets a one-time sign-in link for a browser."""
    sessions = _sessions(request)
    try:
        public_key = public_key_from_node_id(body.node_id)
        signature = base64.b64decode(body.signature, validate=True)
    except (ProtocolError, binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"Malformed provider login: {exc}") from exc
    if not sessions.take_challenge(body.challenge):
        raise AuthenticationFailed("Unknown or expired challenge; ask for a new one.")
    try:
        verify_signature(public_key, signature, login_message(body.challenge))
    except ProtocolError as exc:
        raise AuthenticationFailed("The signature does not match this node's key.") from exc
    return {"url": f"/provider/login?link={sessions.link(body.node_id)}"}


@router.get("/provider/login", include_in_schema=False)
async def provider_link(request: Request, link: str = "") -> Response:
    node_id = _sessions(request).redeem(link)
    if node_id is None:
        return HTMLResponse(
            (STATIC / "provider_login.html").read_text().replace(
                "<!--error-->", '<p class="error" role="alert">That link was used or expired.</p>'
            ),
            status_code=401,
        )  # fmt: skip
    session = _sessions(request).open("provider", node_id)
    return _signed_in(RedirectResponse("/provider", status_code=303), request, session)


@router.get("/provider/v1/me")
async def provider_overview(node_id: ProviderDep, request: Request) -> dict[str, Any]:
    """The signed-in provider's own node: earnings, reputation, jobs, advert."""
    return await _overview(request).provider(node_id)
