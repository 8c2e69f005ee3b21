"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions, receipts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from coordinator.api.deps import BodyDep, ClientDep, GatewayDep, SettlementDep
from coordinator.api.schemas import ChatCompletionBody, CompletionBody
from coordinator.api.sse import EventStreamResponse
from coordinator.errors import InvalidRequest, NotFound
from coordinator.services.gateway import CHAT, COMPLETIONS, Completion, CompletionRequest

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
        "X-Agora-Request-Id": completion.facts.request_id,
        "X-Agora-Worker": completion.worker_id,
        "X-Agora-Route": completion.decision.explain(),
    }


async def _sse(completion: Completion) -> AsyncGenerator[tuple[bytes, bool]]:
    async for batch, last in completion.stream():
        body = b"".join(b"data: " + chunk + b"\n\n" for chunk in batch)
        yield (body + b"data: [DONE]\n\n", True) if last else (body, False)


async def _complete(
    gateway: GatewayDep,
    client: str,
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
    )
    completion = await gateway.start(client, request)
    if request.stream:
        return EventStreamResponse(_sse(completion), headers=_headers(completion))
    return JSONResponse(await completion.whole(), headers=_headers(completion))


@router.post("/chat/completions")
async def chat_completions(client: ClientDep, body: BodyDep, gateway: GatewayDep) -> Response:
    parsed = _parse(ChatCompletionBody, body)
    return await _complete(gateway, client, CHAT, parsed, body)


@router.post("/completions")
async def completions(client: ClientDep, body: BodyDep, gateway: GatewayDep) -> Response:
    parsed = _parse(CompletionBody, body)
    return await _complete(gateway, client, COMPLETIONS, parsed, body)


class ModelList(BaseModel):
    object: str = "list"
    data: list[dict[str, Any]]


@router.get("/models")
async def list_models(_client: ClientDep, gateway: GatewayDep) -> ModelList:
    return ModelList(data=gateway.list_models())


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, _client: ClientDep, gateway: GatewayDep) -> dict[str, Any]:
    for model in gateway.list_models():
        if model["id"] == model_id:
            return model
    raise NotFound(f"The model `{model_id}` does not exist.", param="model", code="model_not_found")


@router.get("/receipts/{request_id}")
async def get_receipt(
    request_id: str, client: ClientDep, settlement: SettlementDep
) -> dict[str, Any]:
    """A countersigned receipt; `request_id` may be the response id (chatcmpl-…/cmpl-…)."""
    rid = request_id.rsplit("-", 1)[-1]
    record = await asyncio.to_thread(settlement.load, rid)
    if record is None or record.client != client:
        raise NotFound(f"No receipt for request `{request_id}`.", param="request_id")
    return {
        "object": "receipt",
        "request_id": rid,
        "amount_total": record.amount_total,
        **record.receipt.to_json(),
    }
