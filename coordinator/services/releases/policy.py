"""A release as plain values, and the pure rules that pick a version for a request."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

ACTIVE, ROLLED_BACK = "active", "rolled_back"


@dataclass(frozen=True)
class Version:
    model: str  # the public name
    version: str
    serves: str  # the served-model name workers advertise
    weight: int = 0  # relative share of the model's traffic
    state: str = ACTIVE
    adapter_sha256: str | None = None
    tokenizer_sha256: str | None = None
    max_price_prompt: int | None = None  # micro-units per 1M tokens, client price
    max_price_completion: int | None = None

    @property
    def ref(self) -> str:
        """`name@version`: what a client may ask for, and what responses name."""
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class RollbackPolicy:
    error_rate: float = 0.01  # a version failing more than this share of its requests …
    error_ratio: float = 2.0  # … and at least this many times the stable version's share,
    ttft_ratio: float = 2.0  # or with a TTFT p95 this many times the stable version's,
    window_s: float = 300.0  # over this sliding window,
    min_requests: int = 20  # with at least this many requests in it, is rolled back
    # the error rule must hold beyond chance: at most this probability that a version as
    # good as the stable one shows that many failures (the rule looks after every request)
    alpha: float = 0.001
    latency_min_requests: int = 100  # a p95 needs more samples than an error rate

    def as_dict(self) -> dict[str, float | int]:
        return {
            "error_rate": self.error_rate, "error_ratio": self.error_ratio,
            "ttft_ratio": self.ttft_ratio, "window_s": self.window_s,
            "min_requests": self.min_requests, "alpha": self.alpha,
            "latency_min_requests": self.latency_min_requests,
        }  # fmt: skip


@dataclass(frozen=True)
class Release:
    name: str
    stable: str
    versions: tuple[Version, ...]
    sticky: bool = False  # A/B: the same API key always sees the same version
    shadow_version: str | None = None
    shadow_share: float = 0.0
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)

    def version(self, version: str) -> Version | None:
        return next((v for v in self.versions if v.version == version), None)

    @property
    def stable_version(self) -> Version:
        found = self.version(self.stable)
        assert found is not None, "a release always holds its stable version"
        return found

    @property
    def live(self) -> tuple[Version, ...]:
        """Versions that take traffic, in a fixed order (the picks depend on it)."""
        return tuple(
            sorted((v for v in self.versions if v.state == ACTIVE and v.weight > 0),
                   key=lambda v: v.version)
        )  # fmt: skip

    def pick(self, draw: float) -> Version:
        """The version a draw in [0, 1) lands on, by weight; the stable version when no
        version has weight."""
        live = self.live
        total = sum(v.weight for v in live)
        if not total:
            return self.stable_version
        point = draw * total
        for version in live:
            point -= version.weight
            if point < 0:
                return version
        return live[-1]

    def shares(self) -> dict[str, float]:
        total = sum(v.weight for v in self.live)
        if not total:
            return {self.stable: 1.0}
        return {v.version: v.weight / total for v in self.live}


def sticky_draw(model: str, key: str) -> float:
    """A key's fixed draw for a model: the same key always lands on the same version while
    the weights stay the same, and keys spread over [0, 1) like random draws."""
    digest = hashlib.sha256(f"{model}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_ref(model: str) -> tuple[str, str | None]:
    """`name@version` → (name, version); a plain name → (name, None)."""
    name, at, version = model.rpartition("@")
    if not at or not name or not version:
        return model, None
    return name, version


# ---------------------------------------------------------------- as the store keeps them
def release_from_row(row: dict[str, Any]) -> Release:
    """A release as `store.releases_store.load` gives it."""
    name = row["name"]
    versions = tuple(
        Version(
            model=name,
            version=v["version"],
            serves=v["serves"],
            weight=v["weight"],
            state=v["state"],
            adapter_sha256=v["adapter_sha256"],
            tokenizer_sha256=v["tokenizer_sha256"],
            max_price_prompt=v["max_price_prompt_per_mtok"],
            max_price_completion=v["max_price_completion_per_mtok"],
        )
        for v in row["versions"]
    )
    rollback = RollbackPolicy(**row["rollback"]) if row["rollback"] else RollbackPolicy()
    return Release(
        name=name, stable=row["stable"], versions=versions, sticky=row["sticky"],
        shadow_version=row["shadow_version"], shadow_share=row["shadow_share"], rollback=rollback,
    )  # fmt: skip


def release_to_row(release: Release) -> dict[str, Any]:
    return {
        "name": release.name, "stable": release.stable, "sticky": release.sticky,
        "shadow_version": release.shadow_version, "shadow_share": release.shadow_share,
        "rollback": release.rollback.as_dict(),
        "versions": [
            {"version": v.version, "serves": v.serves, "adapter_sha256": v.adapter_sha256,
             "tokenizer_sha256": v.tokenizer_sha256,
             "max_price_prompt_per_mtok": v.max_price_prompt,
             "max_price_completion_per_mtok": v.max_price_completion, "weight": v.weight,
             "state": v.state}
            for v in release.versions
        ],
    }  # fmt: skip
