"""OpenAI's Files API (/v1/files, purpose `batch`) and Batch API (/v1/batches), for the
official SDK's `client.files` and `client.batches`; the operator's view at /admin/v1/batches."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from coordinator.api.deps import AdminDep, BodyDep, PrincipalDep, validated
from coordinator.api.errors import documented
from coordinator.errors import InvalidRequest, PayloadTooLarge
from coordinator.services.batches.files import FileLibrary
from coordinator.services.batches.lines import ENDPOINTS
from coordinator.services.batches.runner import BatchRunner

router = APIRouter(prefix="/v1", responses=documented(400, 401, 404, 413, 431))
admin = APIRouter(prefix="/admin/v1", responses=documented(401, 403, 404))


async def get_files(request: Request) -> FileLibrary:
    files: FileLibrary = request.app.state.files
    return files


async def get_batches(request: Request) -> BatchRunner:
    batches: BatchRunner = request.app.state.batches
    return batches


FilesDep = Annotated[FileLibrary, Depends(get_files)]
BatchesDep = Annotated[BatchRunner, Depends(get_batches)]
Limit = Annotated[int, Query(ge=1, le=10_000)]


def _page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    shown = data[:limit]
    return {
        "object": "list", "data": shown, "has_more": len(data) > limit,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
    }  # fmt: skip


# ---------------------------------------------------------------------- files
_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "JSONL: one request per line"},
                           "purpose": {"type": "string", "enum": ["batch"]}},
        }}},
    }
}  # fmt: skip


@router.post("/files", openapi_extra=_UPLOAD_DOC)
async def upload_file(request: Request, principal: PrincipalDep, files: FilesDep) -> dict[str, Any]:
    """Upload a batch input file (checked line by line; a bad file is refused whole, every
    bad line named). The key is checked and the size bounded before the body is read."""
    declared = request.headers.get("content-length") or ""
    if not declared.isdigit():
        raise InvalidRequest("An upload needs a Content-Length header.", param="file")
    if int(declared) > files.max_bytes + 65_536:  # the file and the form around it
        raise PayloadTooLarge(f"The file is larger than {files.max_bytes} bytes.")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # starlette's multipart errors: the body is not a form
        raise InvalidRequest(f"The body is not a multipart form: {exc}", param="file") from exc
    file, purpose = form.get("file"), form.get("purpose")
    if not isinstance(file, UploadFile):
        raise InvalidRequest("Send the file as the form's `file` part.", param="file")
    if not isinstance(purpose, str):
        raise InvalidRequest("Say the file's `purpose` (batch).", param="purpose")
    data = await file.read(files.max_bytes + 1)
    return await files.upload(principal.client, file.filename or "", purpose, data)


@router.get("/files")
async def list_files(
    principal: PrincipalDep, files: FilesDep, purpose: str | None = None,
    limit: Limit = 10_000, after: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return _page(await files.listed(principal.client, purpose, limit + 1, after), limit)


@router.get("/files/{file_id}")
async def get_file(file_id: str, principal: PrincipalDep, files: FilesDep) -> dict[str, Any]:
    return await files.describe(principal.client, file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, principal: PrincipalDep, files: FilesDep) -> Response:
    data = await files.content(principal.client, file_id)
    return Response(data, media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, principal: PrincipalDep, files: FilesDep) -> dict[str, Any]:
    return await files.delete(principal.client, file_id)


# ---------------------------------------------------------------------- batches
class BatchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. the SDK's output_expires_after
    input_file_id: Annotated[str, Field(strict=True, min_length=1)]
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: Annotated[str, Field(strict=True)] = "24h"
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16
    )


@router.post("/batches")
async def create_batch(
    principal: PrincipalDep, body: BodyDep, batches: BatchesDep
) -> dict[str, Any]:
    """Run every request of an uploaded file on capacity online traffic leaves free, at the
    workers' batch prices (by default half the online price)."""
    parsed = validated(BatchBody, body)
    return await batches.create(principal, parsed.input_file_id, parsed.endpoint,
                                parsed.completion_window, parsed.metadata)  # fmt: skip


@router.get("/batches")
async def list_batches(
    principal: PrincipalDep, batches: BatchesDep, limit: Limit = 20, after: str | None = None
) -> dict[str, Any]:
    return _page(await batches.listed(principal.client, limit + 1, after), limit)


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, principal: PrincipalDep, batches: BatchesDep) -> dict[str, Any]:
    return await batches.describe(principal.client, batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(
    batch_id: str, principal: PrincipalDep, batches: BatchesDep
) -> dict[str, Any]:
    return await batches.cancel(principal.client, batch_id)


# ---------------------------------------------------------------------- the operator's view
@admin.get("/batches")
async def all_batches(_admin: AdminDep, batches: BatchesDep, limit: Limit = 100) -> dict[str, Any]:
    """Every client's batches, newest first, and what they use of the market now."""
    listed = await batches.listed(None, limit, None)
    return {"batches": listed, **await batches.overview(listed)}
