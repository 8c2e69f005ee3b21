"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings, plus /v1/receipts/{id} and /v1/routing/{id} for what Agora adds."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from coordinator.api.deps import BodyDep, PrincipalDep, RequestPathDep, SettlementDep, validated
from coordinator.api.errors import documented
from coordinator.api.openapi import body_doc
from coordinator.api.schemas import ChatCompletionBody, CompletionBody, EmbeddingBody
from coordinator.api.sse import EventStreamResponse
from coordinator.errors import NotFound
from coordinator.services.request_path.cache_hit import CacheHit
from coordinator.services.request_path.fulfilment import Fulfilment
from coordinator.services.request_path.request import CompletionRequest
from protocol.completions import CHAT, COMPLETIONS, EMBEDDINGS

router = APIRouter(prefix="/v1", responses=documented(400, 401, 404, 413, 429, 431, 503))


SessionDep = Annotated[
    str,
    Header(
        alias="X-Agora-Session",
        description="A conversation's key: its turns go to the worker holding its context "
        "(default: the body's `user`).",
    ),
]  # fmt: skip


CacheDep = Annotated[
    str,
    Header(
        alias="X-Agora-Cache",
        description="`on`: answer a deterministic request (temperature 0 or a seed) from the "
        "response cache when this key asked the same before, and keep this answer for later.",
    ),
]  # fmt: skip


def _session_key(client: str, header: str, body: dict[str, Any]) -> str:
    """A conversation's routing key, within its client (two clients' `user` values never
    meet); a hint only: any length is taken, its first 200 characters count."""
    given = header or (body["user"] if isinstance(body.get("user"), str) else "")
    return f"{client}/{given[:200]}" if given else ""


def _headers(answer: Fulfilment | CacheHit) -> dict[str, str]:
    route = answer.route
    headers = {
        "X-Agora-Model": answer.request.model_shown,
        "X-Agora-Worker": answer.worker_id,
        "X-Agora-Route": route.decision.explain() if route else "",
    }
    policy = answer.request.policy
    if policy is not None:  # which policy version ran (its findings are in the audit log)
        headers["X-Agora-Policy"] = f"{policy.policy.label} {policy.policy.sha256[:16]}"
    if answer.cache_status:  # hit, miss, or bypass (asked for, but not cacheable)
        headers["X-Agora-Cache"] = answer.cache_status
    if isinstance(answer, CacheHit):
        headers["X-Agora-Cache-Source"] = answer.source
        headers["X-Agora-Charged"] = str(answer.charged)
    return headers


async def _complete(
    path: RequestPathDep,
    principal: PrincipalDep,
    endpoint: str,
    parsed: ChatCompletionBody | CompletionBody,
    body: dict[str, Any],
    session: str = "",
    cache: str = "",
) -> Response:
    request = CompletionRequest(
        endpoint=endpoint,
        model=parsed.model,
        body=body,
        stream=bool(parsed.stream),
        include_usage=parsed.include_usage,
        max_tokens=parsed.max_output_tokens,
        prefs=parsed.provider.to_preferences(),
        wants_token_ids=bool(parsed.return_token_ids),
        fallbacks=tuple(parsed.models),
        session=_session_key(principal.client, session, body),
        cache=cache.strip().lower() in ("on", "true", "1", "yes"),
    )
    fulfilment = await path.serve(principal, request)
    if request.stream:
        return EventStreamResponse(
            fulfilment.stream(), headers=_headers(fulfilment), on_close=fulfilment.close
        )
    return JSONResponse(await fulfilment.whole(), headers=_headers(fulfilment))


@router.post(
    "/chat/completions",
    openapi_extra=body_doc(ChatCompletionBody),
    responses=documented(402),
)
async def chat_completions(
    principal: PrincipalDep, body: BodyDep, path: RequestPathDep, session: SessionDep = "",
    cache: CacheDep = "",
) -> Response:  # fmt: skip
    parsed = validated(ChatCompletionBody, body)
    return await _complete(path, principal, CHAT, parsed, body, session, cache)


@router.post("/completions", openapi_extra=body_doc(CompletionBody), responses=documented(402))
async def completions(
    principal: PrincipalDep, body: BodyDep, path: RequestPathDep, session: SessionDep = "",
    cache: CacheDep = "",
) -> Response:  # fmt: skip
    parsed = validated(CompletionBody, body)
    return await _complete(path, principal, COMPLETIONS, parsed, body, session, cache)


@router.post("/embeddings", openapi_extra=body_doc(EmbeddingBody), responses=documented(402))
async def embeddings(principal: PrincipalDep, body: BodyDep, path: RequestPathDep) -> Response:
    """Vectors from a node that advertises the model as an embedding model, billed per input
    token from its signed receipt (the response's `id` fetches it)."""
    parsed = validated(EmbeddingBody, body)
    request = CompletionRequest(
        endpoint=EMBEDDINGS,
        model=parsed.model,
        body=body,
        stream=False,
        include_usage=False,
        max_tokens=None,
        prefs=parsed.provider.to_preferences(),
        fallbacks=tuple(parsed.models),
    )
    fulfilment = await path.begin(principal, request)
    return JSONResponse(await fulfilment.whole(), headers=_headers(fulfilment))


class ModelList(BaseModel):
    object: str = "list"
    data: list[dict[str, Any]]


@router.get("/models")
async def list_models(_principal: PrincipalDep, path: RequestPathDep) -> ModelList:
    return ModelList(data=path.list_models())


@router.get("/models/{model_id:path}")
async def get_model(
    model_id: str, _principal: PrincipalDep, path: RequestPathDep
) -> dict[str, Any]:
    for model in path.list_models():
        if model["id"] == model_id:
            return model
    raise NotFound(f"The model `{model_id}` does not exist.", param="model", code="model_not_found")


def _request_id(any_id: str) -> str:
    """Accept the response id (chatcmpl-…/cmpl-…) as well as the bare request id."""
    return any_id.rsplit("-", 1)[-1]


@router.get("/receipts/{request_id}")
async def get_receipt(
    request_id: str, principal: PrincipalDep, settlement: SettlementDep, path: RequestPathDep
) -> dict[str, Any]:
    """The countersigned receipt(s) of a request, and the signed statement of what the client
    paid for it (`agora receipt verify` checks both offline)."""
    rid = _request_id(request_id)
    await settlement.quiesce()  # a receipt asked for right after its response is there
    document = await asyncio.to_thread(settlement.document, rid, principal.client)
    if document is None and path.answers is not None:  # answered from the response cache
        document = await asyncio.to_thread(path.answers.document, rid, principal.client)
    if document is None:
        raise NotFound(f"No receipt for request `{request_id}`.", param="request_id")
    return document


@router.get("/market")
async def market(request: Request) -> dict[str, Any]:
    """The demand board (public, no key): per model, over the last 60 s, 5 min and 1 h,
    requests and tokens served, demand left unmet (no free worker; max_price no worker met),
    queue depth and waits, clearing prices (per 1M tokens, what the serving workers signed),
    and capacity online now; signed by this coordinator, with its p2p peers' boards."""
    view: dict[str, Any] = request.app.state.market()
    return view


@router.get("/routing/{request_id}")
async def get_routing(
    request_id: str, principal: PrincipalDep, path: RequestPathDep
) -> dict[str, Any]:
    """Why a request went where it went: candidates, score terms, every attempt."""
    record = path.routing_record(_request_id(request_id))
    if record is None or record.client != principal.client:
        raise NotFound(f"No routing record for request `{request_id}`.", param="request_id")
    return record.as_dict()
