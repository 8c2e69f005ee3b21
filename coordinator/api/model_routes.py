"""Operator API for the model catalogue (admin token): public models, their versions, the
release policy (canary weights, sticky A/B, shadow), promotion, rollback and history. Every
change is in the release history and the admin audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from coordinator.api.deps import AdminDep, admin_body
from coordinator.api.errors import documented
from coordinator.api.openapi import body_doc
from coordinator.services.releases.book import ReleaseBook
from coordinator.services.releases.policy import RollbackPolicy, Version

router = APIRouter(prefix="/admin/v1/models", responses=documented(400, 401, 403, 404, 413, 431))
ACTOR = "admin-api"
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")]


async def get_releases(request: Request) -> ReleaseBook:
    releases: ReleaseBook = request.app.state.releases
    return releases


ReleasesDep = Annotated[ReleaseBook, Depends(get_releases)]


class VersionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Name
    serves: str = Field(min_length=1, max_length=200)  # the served-model name workers advertise
    weight: int = Field(default=0, ge=0)
    adapter_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tokenizer_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    max_price_prompt_per_mtok: int | None = Field(default=None, ge=0)  # client price caps
    max_price_completion_per_mtok: int | None = Field(default=None, ge=0)

    def value(self) -> Version:
        return Version(
            model="", version=self.version, serves=self.serves, weight=self.weight,
            adapter_sha256=self.adapter_sha256, tokenizer_sha256=self.tokenizer_sha256,
            max_price_prompt=self.max_price_prompt_per_mtok,
            max_price_completion=self.max_price_completion_per_mtok,
        )  # fmt: skip


class RollbackSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error_rate: float = Field(default=0.01, ge=0, le=1)
    error_ratio: float = Field(default=2.0, ge=1)
    ttft_ratio: float = Field(default=2.0, ge=1)
    window_s: float = Field(default=300.0, gt=0)
    min_requests: int = Field(default=20, ge=1)
    alpha: float = Field(default=0.001, gt=0, lt=1)
    latency_min_requests: int = Field(default=100, ge=1)

    def value(self) -> RollbackPolicy:
        return RollbackPolicy(**self.model_dump())


class NewModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    versions: list[VersionSpec] = Field(min_length=1, max_length=100)
    stable: str | None = None  # default: the first version
    rollback: RollbackSpec | None = None


class Shadow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None  # null: no shadow traffic
    share: float = Field(default=0.0, ge=0, le=1)


class ReleaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Annotated[int, Field(ge=0)]] | None = None  # e.g. {"v1": 95, "v2": 5}
    sticky: bool | None = None
    shadow: Shadow | None = None
    rollback: RollbackSpec | None = None


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = None  # default: every version but the stable one
    reason: str = Field(default="by hand", max_length=500)


@router.get("")
async def list_models(_admin: AdminDep, releases: ReleasesDep) -> dict[str, Any]:
    """Every public model with its versions, their traffic shares and how each is doing."""
    return {"models": releases.describe()}


@router.post("", status_code=201, openapi_extra=body_doc(NewModel))
async def create_model(
    body: Annotated[NewModel, admin_body(NewModel)], releases: ReleasesDep
) -> dict[str, Any]:
    stable = body.stable or body.versions[0].version
    rollback = body.rollback.value() if body.rollback else None
    versions = [v.value() for v in body.versions]
    return await releases.create(body.name, versions, stable, ACTOR, rollback)


@router.get("/{name}")
async def get_model(name: str, _admin: AdminDep, releases: ReleasesDep) -> dict[str, Any]:
    return releases.describe_one(name)


@router.post("/{name}/versions", status_code=201, openapi_extra=body_doc(VersionSpec))
async def add_version(
    name: str, body: Annotated[VersionSpec, admin_body(VersionSpec)], releases: ReleasesDep
) -> dict[str, Any]:
    """A new version, at weight 0 until a release gives it traffic."""
    return await releases.add_version(name, body.value(), ACTOR)


@router.post("/{name}/release", openapi_extra=body_doc(ReleaseSpec))
async def release(
    name: str, body: Annotated[ReleaseSpec, admin_body(ReleaseSpec)], releases: ReleasesDep
) -> dict[str, Any]:
    """Canary weights, sticky A/B, shadow traffic, the rollback rule (any of them)."""
    shadow = (body.shadow.version, body.shadow.share) if body.shadow else None
    return await releases.release(
        name, ACTOR, weights=body.weights, sticky=body.sticky, shadow=shadow,
        rollback=body.rollback.value() if body.rollback else None,
    )  # fmt: skip


@router.post("/{name}/promote", openapi_extra=body_doc(Promotion))
async def promote(
    name: str, body: Annotated[Promotion, admin_body(Promotion)], releases: ReleasesDep
) -> dict[str, Any]:
    """The version becomes the stable one and takes all the traffic."""
    return await releases.promote(name, body.version, ACTOR)


@router.post("/{name}/rollback", openapi_extra=body_doc(Rollback))
async def roll_back(
    name: str, body: Annotated[Rollback, admin_body(Rollback)], releases: ReleasesDep
) -> dict[str, Any]:
    return await releases.roll_back(name, ACTOR, body.version, body.reason)


@router.get("/{name}/history")
async def history(
    name: str, _admin: AdminDep, releases: ReleasesDep, limit: int = 100
) -> dict[str, Any]:
    return {"name": name, "events": await releases.history(name, min(max(limit, 1), 1000))}
