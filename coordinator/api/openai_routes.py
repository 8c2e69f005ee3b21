"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions, plus
/v1/receipts/{id} and /v1/routing/{id} for what Agora adds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from coordinator.api.deps import BodyDep, GatewayDep, PrincipalDep, SettlementDep
from coordinator.api.schemas import ChatCompletionBody, CompletionBody
from coordinator.api.sse import EventStreamResponse
from coordinator.errors import InvalidRequest, NotFound
from coordinator.services.jobs import CompletionRequest
from coordinator.services.relay import Completion
from protocol.completions import CHAT, COMPLETIONS

router = APIRouter(prefix="/v1")


def _parse(schema: type[ChatCompletionBody | CompletionBody], body: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param}: {first['msg']}", param=param) from exc


def _headers(completion: Completion) -> dict[str, str]:
    return {
        "X-Agora-Worker": completion.worker_id,
        "X-Agora-Route": completion.route.decision.explain(),
    }


async def _sse(completion: Completion) -> AsyncGenerator[tuple[bytes, bool]]:
    async for batch, last in completion.stream():
        body = b"".join(b"data: " + chunk + b"\n\n" for chunk in batch)
        yield (body + b"data: [DONE]\n\n", True) if last else (body, False)


async def _complete(
    gateway: GatewayDep,
    principal: PrincipalDep,
    endpoint: str,
    parsed: ChatCompletionBody | CompletionBody,
    body: dict[str, Any],
) -> Response:
    request = CompletionRequest(
        endpoint=endpoint,
        model=parsed.model,
        body=body,
        stream=parsed.stream,
        include_usage=parsed.include_usage,
        max_tokens=parsed.max_output_tokens,
        prefs=parsed.provider.to_preferences(),
        wants_token_ids=parsed.return_token_ids,
    )
    completion = await gateway.start(principal, request)
    if request.stream:
        return EventStreamResponse(_sse(completion), headers=_headers(completion))
    return JSONResponse(await completion.whole(), headers=_headers(completion))


@router.post("/chat/completions")
async def chat_completions(principal: PrincipalDep, body: BodyDep, gateway: GatewayDep) -> Response:
    parsed = _parse(ChatCompletionBody, body)
    return await _complete(gateway, principal, CHAT, parsed, body)


@router.post("/completions")
async def completions(principal: PrincipalDep, body: BodyDep, gateway: GatewayDep) -> Response:
    parsed = _parse(CompletionBody, body)
    return await _complete(gateway, principal, COMPLETIONS, parsed, body)


class ModelList(BaseModel):
    object: str = "list"
    data: list[dict[str, Any]]


@router.get("/models")
async def list_models(_principal: PrincipalDep, gateway: GatewayDep) -> ModelList:
    return ModelList(data=gateway.list_models())


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, _principal: PrincipalDep, gateway: GatewayDep) -> dict[str, Any]:
    for model in gateway.list_models():
        if model["id"] == model_id:
            return model
    raise NotFound(f"The model `{model_id}` does not exist.", param="model", code="model_not_found")


def _request_id(any_id: str) -> str:
    """Accept the response id (chatcmpl-…/cmpl-…) as well as the bare request id."""
    return any_id.rsplit("-", 1)[-1]


@router.get("/receipts/{request_id}")
async def get_receipt(
    request_id: str, principal: PrincipalDep, settlement: SettlementDep
) -> dict[str, Any]:
    """The countersigned receipt(s) of a request and what the client paid for it."""
    rid = _request_id(request_id)
    record = await asyncio.to_thread(settlement.load, rid)
    if record is None or record.client != principal.client:
        raise NotFound(f"No receipt for request `{request_id}`.", param="request_id")
    return {
        "object": "receipt",
        "request_id": rid,
        "amount_total": record.amount_total,
        **record.receipt.to_json(),
        "continuations": [segment.to_json() for segment in record.segments],
    }


@router.get("/routing/{request_id}")
async def get_routing(
    request_id: str, principal: PrincipalDep, gateway: GatewayDep
) -> dict[str, Any]:
    """Why a request went where it went: candidates, score terms, every attempt."""
    record = gateway.decisions.get(_request_id(request_id))
    if record is None or record.client != principal.client:
        raise NotFound(f"No routing record for request `{request_id}`.", param="request_id")
    return record.as_dict()
