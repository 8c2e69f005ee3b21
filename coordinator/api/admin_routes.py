"""Operator API (admin token): clients, credit, balances, workers."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from coordinator.api.deps import AccountsDep, AdminDep, GatewayDep

router = APIRouter(prefix="/admin/v1")


class NewClient(BaseModel):
    name: str
    credit: int = Field(default=0, ge=0)  # micro-units


class Credit(BaseModel):
    amount: int = Field(gt=0)  # micro-units
    idempotency_key: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=100)


@router.post("/clients", status_code=201)
async def create_client(body: NewClient, _admin: AdminDep, accounts: AccountsDep) -> dict[str, Any]:
    secret = await asyncio.to_thread(accounts.create_client, body.name, body.credit)
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
                "models": {
                    m.name: {
                        "available": w.available(m.name),
                        "in_flight": w.in_flight.get(m.name, 0),
                        "max_concurrency": m.max_concurrency,
                        "engine_running": w.loads[m.name].running if m.name in w.loads else None,
                        "engine_waiting": w.loads[m.name].waiting if m.name in w.loads else None,
                        "kv_cache_usage": w.loads[m.name].kv_cache_usage
                        if m.name in w.loads
                        else None,
                        "price_prompt_per_mtok": m.price_prompt_per_mtok,
                        "price_completion_per_mtok": m.price_completion_per_mtok,
                        "context_length": m.context_length,
                    }
                    for m in w.advert.models
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
