"""Operator API for policies (admin token): save a policy's JSON (a new version when it
changed), attach it to an API key or a client, list them, and see what they did (counts by
kind from the audit log; never the values they found)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from coordinator.api.deps import AdminDep, BodyDep
from coordinator.api.errors import documented
from coordinator.errors import InvalidRequest, NotFound
from coordinator.services.policy.book import PolicyBook

router = APIRouter(prefix="/admin/v1/policies", responses=documented(400, 401, 403, 404, 413))


async def get_policies(request: Request) -> PolicyBook:
    policies: PolicyBook = request.app.state.policies
    return policies


PoliciesDep = Annotated[PolicyBook, Depends(get_policies)]


class Attachment(BaseModel):
    policy: str | None = Field(default=None, description="The policy to run (null: detach).")
    key_id: int | None = Field(default=None, description="An API key (its own policy wins).")
    client: str | None = Field(default=None, description="A client (every key of it).")


@router.get("")
async def list_policies(_admin: AdminDep, policies: PoliciesDep) -> dict[str, Any]:
    """Every policy's newest version: its steps, SHA-256, and the keys and clients it runs for."""
    await asyncio.to_thread(policies.fresh)
    return {"policies": policies.describe()}


@router.put("/{name}", status_code=201)
async def save_policy(
    name: str, body: BodyDep, response: Response, _admin: AdminDep, policies: PoliciesDep
) -> dict[str, Any]:
    """The body is the policy (`{"steps": [...]}`); 201 with a new version, 200 when the same
    JSON is already its newest version."""
    policy, new = await asyncio.to_thread(policies.save, name, body)
    if not new:
        response.status_code = 200
    return policy.describe()


@router.post("/attach")
async def attach_policy(body: BodyDep, _admin: AdminDep, policies: PoliciesDep) -> dict[str, Any]:
    """Run a policy for a key or a client (`policy: null` removes theirs)."""
    try:
        wanted = Attachment.model_validate(body)
    except ValueError as exc:
        raise InvalidRequest(f"Malformed attachment: {exc}") from exc
    subject = await asyncio.to_thread(
        policies.attach, wanted.policy, key_id=wanted.key_id, client=wanted.client
    )
    return {"subject": subject, "policy": wanted.policy}


@router.get("/versions/{sha256}")
async def policy_version(sha256: str, _admin: AdminDep, policies: PoliciesDep) -> dict[str, Any]:
    """The policy version a receipt names (by its SHA-256): name, version and JSON."""
    found = await asyncio.to_thread(policies.version, sha256)
    if found is None:
        raise NotFound(f"No policy version {sha256}.", param="sha256")
    return found


@router.get("/hits")
async def policy_hits(_admin: AdminDep, policies: PoliciesDep) -> dict[str, Any]:
    """What policies did lately (the audit log's newest 2,000 policy events), by kind."""
    return await asyncio.to_thread(policies.hits_summary)
