"""Operator API (admin token): clients, credit, balances, workers."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from coordinator.api.deps import (
    AccountsDep,
    AdminDep,
    OverviewDep,
    PayoutsDep,
    SettlementDep,
    admin_body,
)
from coordinator.api.errors import documented
from coordinator.api.openapi import body_doc

router = APIRouter(prefix="/admin/v1", responses=documented(400, 401, 403, 404, 413, 431))


class NewClient(BaseModel):
    name: str
    credit: int = Field(default=0, ge=0)  # micro-units
    rpm_limit: int | None = Field(default=None, ge=1)  # requests per minute for its first key
    tpm_limit: int | None = Field(default=None, ge=1)  # tokens per minute for its first key


class NewKey(BaseModel):
    rpm_limit: int | None = Field(default=None, ge=1)
    tpm_limit: int | None = Field(default=None, ge=1)


class Credit(BaseModel):
    amount: int = Field(gt=0)  # micro-units
    idempotency_key: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=100)


@router.post("/clients", status_code=201, openapi_extra=body_doc(NewClient))
async def create_client(
    body: Annotated[NewClient, admin_body(NewClient)], accounts: AccountsDep
) -> dict[str, Any]:
    secret = await asyncio.to_thread(
        accounts.create_client, body.name, body.credit, body.rpm_limit, body.tpm_limit
    )
    balance = await asyncio.to_thread(accounts.balance, body.name)
    return {"name": body.name, "api_key": secret, "balance": balance}


@router.post("/clients/{name}/credit", openapi_extra=body_doc(Credit))
async def add_credit(
    name: str, body: Annotated[Credit, admin_body(Credit)], accounts: AccountsDep
) -> dict[str, Any]:
    txid = f"deposit:{body.idempotency_key}"
    posted = await asyncio.to_thread(accounts.add_credit, name, body.amount, txid)
    balance = await asyncio.to_thread(accounts.balance, name)
    return {"name": name, "posted": posted, "balance": balance}


@router.post("/clients/{name}/keys", status_code=201, openapi_extra=body_doc(NewKey))
async def create_key(
    name: str, body: Annotated[NewKey, admin_body(NewKey)], accounts: AccountsDep
) -> dict[str, Any]:
    """Another key for an existing client (shown once)."""
    secret = await asyncio.to_thread(
        accounts.create_client, name, 0, body.rpm_limit, body.tpm_limit
    )
    return {"name": name, "api_key": secret}


@router.get("/keys")
async def list_keys(
    _admin: AdminDep, accounts: AccountsDep, client: str | None = None
) -> dict[str, Any]:
    keys = await asyncio.to_thread(accounts.list_keys, client)
    return {"keys": [dataclasses.asdict(k) for k in keys]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: int, _admin: AdminDep, accounts: AccountsDep) -> dict[str, Any]:
    return dataclasses.asdict(await asyncio.to_thread(accounts.revoke_key, key_id))


@router.get("/routing")
async def recent_routing(
    _admin: AdminDep, overview: OverviewDep, limit: int = 50
) -> dict[str, Any]:
    return {"decisions": overview.routing(min(limit, 1000))}


@router.get("/network")
async def network(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """The p2p market as this coordinator sees it: peers, other coordinators and their
    workers, gossip accepted and refused (`{"enabled": false}` when it stands alone)."""
    view: dict[str, Any] = await request.app.state.network_view()
    return view


@router.get("/balances")
async def balances(
    _admin: AdminDep, accounts: AccountsDep, settlement: SettlementDep
) -> dict[str, Any]:
    await settlement.quiesce()  # postings of responses already sent are in
    return {"accounts": await asyncio.to_thread(accounts.balances)}


@router.get("/workers")
async def workers(_admin: AdminDep, overview: OverviewDep) -> dict[str, Any]:
    return {"workers": overview.workers()}


@router.post("/nodes/{node_id}/bond", openapi_extra=body_doc(Credit))
async def add_bond(
    node_id: str, body: Annotated[Credit, admin_body(Credit)], accounts: AccountsDep
) -> dict[str, Any]:
    """A provider's stake (slashed for proven fraud)."""
    posted = await asyncio.to_thread(
        accounts.add_bond, node_id, body.amount, f"bond:{body.idempotency_key}"
    )
    return {"node_id": node_id, "posted": posted}


@router.post("/payouts/close")
async def close_payout_epoch(_admin: AdminDep, payouts: PayoutsDep) -> dict[str, Any]:
    """Close the open epoch: every provider's earnings move to paid, one signed statement each."""
    signed = await asyncio.to_thread(payouts.close, "admin-api")
    return {"statements": [s.to_json() for s in signed]}


@router.get("/payouts")
async def payout_epochs(_admin: AdminDep, payouts: PayoutsDep) -> dict[str, Any]:
    return {"epochs": await asyncio.to_thread(payouts.epochs)}


@router.get("/payouts/{epoch}/statements")
async def payout_statements(epoch: int, _admin: AdminDep, payouts: PayoutsDep) -> dict[str, Any]:
    signed = await asyncio.to_thread(payouts.statements, epoch)
    return {"epoch": epoch, "statements": [s.to_json() for s in signed]}


@router.get("/audit")
async def audit_log(_admin: AdminDep, payouts: PayoutsDep, limit: int = 100) -> dict[str, Any]:
    """The admin actions, newest first (hash-chained; `agora ledger check` verifies it)."""
    return {"events": await asyncio.to_thread(payouts.audit_events, min(limit, 1000))}


@router.get("/metering/mismatches")
async def metering_mismatches(
    _admin: AdminDep, payouts: PayoutsDep, limit: int = 100
) -> dict[str, Any]:
    """Workers that claimed more tokens than the coordinator's recount."""
    return {"mismatches": await asyncio.to_thread(payouts.mismatches, min(limit, 1000))}


@router.get("/trust/events")
async def trust_events(
    _admin: AdminDep, overview: OverviewDep, node_id: str | None = None,
    outcome: str | None = None, limit: int = 100,
) -> dict[str, Any]:  # fmt: skip
    """Reputation evidence (spot checks, rejected receipts, over-claims …), newest first."""
    return await asyncio.to_thread(overview.trust_events, node_id, outcome, min(limit, 1000))
