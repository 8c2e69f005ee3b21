"""Operator API (admin token): clients, credit, balances, workers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from coordinator.api.deps import AccountsDep, AdminDep, GatewayDep, PayoutsDep

router = APIRouter(prefix="/admin/v1")


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


@router.post("/clients", status_code=201)
async def create_client(body: NewClient, _admin: AdminDep, accounts: AccountsDep) -> dict[str, Any]:
    secret = await asyncio.to_thread(
        accounts.create_client, body.name, body.credit, body.rpm_limit, body.tpm_limit
    )
    balance = await asyncio.to_thread(accounts.balance, body.name)
    return {"name": body.name, "api_key": secret, "balance": balance}


@router.post("/clients/{name}/credit")
async def add_credit(
    name: str, body: Credit, _admin: AdminDep, accounts: AccountsDep
) -> dict[str, Any]:
    txid = f"deposit:{body.idempotency_key}"
    posted = await asyncio.to_thread(accounts.add_credit, name, body.amount, txid)
    balance = await asyncio.to_thread(accounts.balance, name)
    return {"name": name, "posted": posted, "balance": balance}


@router.post("/clients/{name}/keys", status_code=201)
async def create_key(
    name: str, body: NewKey, _admin: AdminDep, accounts: AccountsDep
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
async def recent_routing(_admin: AdminDep, gateway: GatewayDep, limit: int = 50) -> dict[str, Any]:
    return {"decisions": [r.as_dict() for r in gateway.decisions.recent(min(limit, 1000))]}


@router.get("/network")
async def network(_admin: AdminDep, request: Request) -> dict[str, Any]:
    """The p2p market as this coordinator sees it: peers, other coordinators and their
    workers, gossip accepted and refused (`{"enabled": false}` when it stands alone)."""
    view: dict[str, Any] = await request.app.state.network_view()
    return view


@router.get("/balances")
async def balances(_admin: AdminDep, accounts: AccountsDep) -> dict[str, Any]:
    return {"accounts": await asyncio.to_thread(accounts.balances)}


@router.get("/workers")
async def workers(_admin: AdminDep, gateway: GatewayDep) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "workers": [
            {
                "node_id": w.node_id,
                "draining": w.draining,
                "quarantined": w.quarantined,
                "reputation": gateway.trust.standing(w.node_id).as_dict()
                if gateway.trust
                else None,
                "models": {
                    name: {
                        "available": slot.available,
                        "in_flight": slot.in_flight,
                        "jobs_elsewhere": slot.jobs_elsewhere,  # for the node's other coordinators
                        "max_concurrency": slot.max_concurrency,
                        "engine_running": slot.engine_running if slot.load_reported else None,
                        "engine_waiting": slot.engine_waiting if slot.load_reported else None,
                        "kv_cache_usage": slot.kv_cache_usage if slot.load_reported else None,
                        "price_prompt_per_mtok": slot.offer.price_prompt_per_mtok,
                        "price_completion_per_mtok": slot.offer.price_completion_per_mtok,
                        "context_length": slot.offer.context_length,
                        "ttft_ewma_s": gateway.stats.get(w.node_id, name).ttft_s,
                        "itl_ewma_s": gateway.stats.get(w.node_id, name).itl_s,
                        "failure_rate": gateway.stats.get(w.node_id, name).failure_rate(),
                        "cooldown_left_s": max(
                            0.0, round(gateway.stats.get(w.node_id, name).cooldown_until - now, 3)
                        ),
                    }
                    for name, slot in w.slots.items()
                },
                "hardware": dict(w.advert.hardware),
                "software": dict(w.advert.software),
                "gpus": [
                    {
                        "index": g.index,
                        "utilization_pct": g.utilization_pct,
                        "memory_used_mib": g.memory_used_mib,
                        "memory_total_mib": g.memory_total_mib,
                    }
                    for g in w.gpus
                ],
                "seconds_since_seen": round(now - w.last_seen, 3),
                "connected_for_s": round(now - w.connected_at, 3),
            }
            for w in gateway.registry.all()
        ]
    }


@router.post("/nodes/{node_id}/bond")
async def add_bond(
    node_id: str, body: Credit, _admin: AdminDep, accounts: AccountsDep
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
    _admin: AdminDep, gateway: GatewayDep, node_id: str | None = None,
    outcome: str | None = None, limit: int = 100,
) -> dict[str, Any]:  # fmt: skip
    """Reputation evidence (spot checks, rejected receipts, over-claims …), newest first."""
    if gateway.trust is None:
        return {"events": [], "counts": {}}
    trust = gateway.trust
    return await asyncio.to_thread(trust.evidence, node_id, outcome, min(limit, 1000))
