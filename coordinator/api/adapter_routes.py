"""Operator API for LoRA adapters (admin token): register an adapter's canonical archive
(protocol.adapter; `agora models add-adapter FOLDER` makes and sends it) and list them. A
model version then names the adapter by its SHA-256, and workers fetch it by that hash."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from coordinator.api.deps import AdminDep
from coordinator.api.errors import documented
from coordinator.errors import PayloadTooLarge
from coordinator.services.adapters import AdapterLibrary

router = APIRouter(prefix="/admin/v1/adapters", responses=documented(400, 401, 403, 413, 431))
ACTOR = "admin-api"
Text = Annotated[str, Query(min_length=1, max_length=200)]


async def get_adapters(request: Request) -> AdapterLibrary:
    adapters: AdapterLibrary = request.app.state.adapters
    return adapters


AdaptersDep = Annotated[AdapterLibrary, Depends(get_adapters)]


@router.get("")
async def list_adapters(_admin: AdminDep, adapters: AdaptersDep) -> dict[str, Any]:
    """Every registered adapter: hash, name, the model it applies to, size."""
    return {"adapters": await adapters.listed()}


@router.post(
    "",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def register_adapter(
    request: Request, response: Response, _admin: AdminDep, adapters: AdaptersDep,
    name: Text, base_model: Text,
) -> dict[str, Any]:  # fmt: skip
    """The body is the adapter's canonical archive; the answer names its SHA-256 (201 when
    new, 200 when the same bytes were registered before)."""
    limit = adapters.max_bytes
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise PayloadTooLarge(f"The adapter archive is larger than {limit} bytes.")
    card, new = await adapters.register(name, base_model, bytes(raw), ACTOR)
    if not new:
        response.status_code = 200
    return card
