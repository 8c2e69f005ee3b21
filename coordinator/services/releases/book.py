"""The owner of every model release: it loads the catalogue, applies operators' changes,
picks the version for each request, learns how versions do, and rolls a failing candidate
back. Collaborators report to it (`observe`, `observe_shadow`, `observe_check`); nobody else
holds a release's state.

Several coordinator processes or replicas share the catalogue through the database: each
re-reads it every `refresh_s`, so an operator's change (or another process's rollback) is
everywhere within that time. The sliding windows are each process's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.errors import InvalidRequest, ModelNotFound, NotFound
from coordinator.observability import Metrics
from coordinator.services.releases.health import Window, WindowStats, rollback_reason
from coordinator.services.releases.policy import (
    ACTIVE,
    ROLLED_BACK,
    Release,
    RollbackPolicy,
    Version,
    release_from_row,
    release_to_row,
    split_ref,
    sticky_draw,
)
from coordinator.store import releases_store
from coordinator.store.db import Engine

log = logging.getLogger("agora.coordinator.releases")
AUTO = "auto-rollback"


@dataclass(frozen=True)
class Target:
    """Where a request for a public model goes: the served model routing looks for, and the
    name the client is shown."""

    serves: str
    shown: str
    version: Version | None = None  # None: a served model asked for by its own name
    canary: bool = False  # picked off the stable version: the stable one takes it on failure


@dataclass
class ShadowTally:
    window: Window
    compared: int = 0  # shadow outputs compared with what the client got
    agreed: int = 0  # … and identical to it


class ReleaseBook:
    def __init__(
        self, db: Engine, *, metrics: Metrics | None = None, rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic, refresh_s: float = 2.0,
        tokenizer_of: Callable[[str], str | None] = lambda _served: None,
        adapter_base_of: Callable[[str], str | None] = lambda _sha256: None,
    ) -> None:  # fmt: skip
        self._db = db
        self._adapter_base_of = adapter_base_of  # a registered adapter's base model
        self._tokenizer_of = (
            tokenizer_of  # the digest of the tokenizer a served model recounts with
        )
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self.refresh_s = refresh_s
        self._releases: dict[str, Release] = {}
        self._windows: dict[tuple[str, str], Window] = {}
        self._shadows: dict[tuple[str, str], ShadowTally] = {}
        self._notes: dict[tuple[str, str], str] = {}  # the last change of a version, and why
        self._changes = asyncio.Lock()  # operators' changes, one at a time
        self._generation = 0  # bumped by every change made here
        self._writes: set[asyncio.Task[None]] = set()  # rollbacks being written

    # ---------------------------------------------------------------- loading
    def load(self) -> None:
        self._releases = {r.name: r for r in map(release_from_row, releases_store.load(self._db))}

    async def keep_fresh(self) -> None:
        """Re-read the catalogue now and then (other processes and replicas change it too)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            generation = self._generation
            try:
                rows = await asyncio.to_thread(releases_store.load, self._db)
            except Exception:
                log.exception("could not re-read the model catalogue")
                continue
            if generation == self._generation and not self._writes:  # nothing newer here
                self._releases = {r.name: r for r in map(release_from_row, rows)}

    async def drain(self) -> None:
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # ---------------------------------------------------------------- the request path
    def get(self, name: str) -> Release | None:
        return self._releases.get(name)

    def targets(self, model: str, key: str) -> list[Target] | None:
        """The versions to try for `model`, in order; None when it is no catalogue name
        (a served model asked for directly)."""
        name, pinned = split_ref(model)
        release = self._releases.get(name)
        if release is None:
            if pinned is not None and model not in self._releases:
                return None  # a served model whose own name holds an "@"
            release = self._releases.get(model)
            if release is None:
                return None
            pinned = None
        if pinned is not None:
            version = release.version(pinned)
            if version is None:
                known = ", ".join(v.version for v in release.versions)
                raise ModelNotFound(
                    f"The model `{name}` has no version `{pinned}` (it has: {known}).",
                    param="model",
                )
            return [_target(version)]
        draw = sticky_draw(name, key) if release.sticky else self._rng.random()
        picked = release.pick(draw)
        if picked.version == release.stable:
            return [_target(picked)]
        return [_target(picked, canary=True), _target(release.stable_version)]

    def shadow_for(self, target: Target) -> Version | None:
        """The version that gets a copy of this request, if the release shadows and the
        draw says so."""
        if target.version is None:
            return None
        release = self._releases.get(target.version.model)
        if release is None or not release.shadow_version or release.shadow_share <= 0:
            return None
        shadow = release.version(release.shadow_version)
        if shadow is None or shadow.version == target.version.version:
            return None
        return shadow if self._rng.random() < release.shadow_share else None

    def observe(self, target: Target, *, failed: bool, ttft_s: float | None) -> None:
        """A request of a version ended (or one of its attempts failed): learn, and roll the
        version back if it now does clearly worse than the stable one."""
        version = target.version
        if version is None:
            return
        if self._metrics:
            outcome = "failed" if failed else "ok"
            self._metrics.release_requests.labels(version.model, version.version, outcome).inc()
        self._record(version.model, version.version, failed, ttft_s)

    def observe_check(self, serves: str, *, genuine: bool) -> None:
        """A spot check judged a job of this served model: a failed one counts against every
        version that serves it."""
        if genuine:
            return
        for release in list(self._releases.values()):
            for version in release.versions:
                if version.serves == serves:
                    self._record(release.name, version.version, True, None)

    def observe_shadow(
        self, version: Version, *, failed: bool, ttft_s: float | None, agreed: bool | None
    ) -> None:
        tally = self._shadow_tally(version.model, version.version)
        tally.window.add(self._clock(), failed, ttft_s)
        if agreed is not None:
            tally.compared += 1
            tally.agreed += agreed

    def _record(self, model: str, version: str, failed: bool, ttft_s: float | None) -> None:
        release = self._releases.get(model)
        if release is None:
            return
        now = self._clock()
        self._window(release, version).add(now, failed, ttft_s)
        current = release.version(version)
        if (
            current is None or version == release.stable or current.state != ACTIVE
            or current.weight <= 0
        ):  # fmt: skip
            return
        candidate = self._window(release, version).stats(now)
        stable = self._window(release, release.stable).stats(now)
        reason = rollback_reason(candidate, stable, release.rollback)
        if reason is not None:
            self._roll_back_now(release, version, AUTO, reason, candidate, stable)

    def _window(self, release: Release, version: str) -> Window:
        key = (release.name, version)
        window = self._windows.get(key)
        if window is None or window.span_s != release.rollback.window_s:
            window = self._windows[key] = Window(release.rollback.window_s)
        return window

    def _shadow_tally(self, model: str, version: str) -> ShadowTally:
        release = self._releases.get(model)
        span = release.rollback.window_s if release else RollbackPolicy().window_s
        tally = self._shadows.get((model, version))
        if tally is None:
            tally = self._shadows[(model, version)] = ShadowTally(Window(span))
        return tally

    def _roll_back_now(
        self, release: Release, version: str, actor: str, reason: str,
        candidate: WindowStats, stable: WindowStats,
    ) -> None:  # fmt: skip
        """Take the version out of traffic at once; the database learns in the background."""
        rolled = _with_versions(release, {version: dict(weight=0, state=ROLLED_BACK)})
        self._releases[release.name] = rolled
        self._notes[(release.name, version)] = f"rolled back automatically: {reason}"
        self._generation += 1
        log.warning("model %s: version %s rolled back: %s", release.name, version, reason)
        if self._metrics:
            self._metrics.rollbacks.labels(release.name, version, "automatic").inc()
        detail = {"reason": reason, "window": candidate.as_dict(), "stable": stable.as_dict()}
        task = asyncio.get_running_loop().create_task(
            self._write(rolled, "rolled_back", version, actor, detail)
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(
        self, release: Release, kind: str, version: str, actor: str, detail: dict[str, Any]
    ) -> None:
        try:
            await asyncio.to_thread(
                releases_store.save, self._db, release_to_row(release), kind=kind, version=version,
                actor=actor, detail=detail,
            )  # fmt: skip
        except Exception:
            log.exception("could not record the rollback of %s@%s", release.name, version)

    # ---------------------------------------------------------------- operators
    def describe(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for release in sorted(self._releases.values(), key=lambda r: r.name):
            shares = release.shares()
            versions = []
            for v in release.versions:
                item: dict[str, Any] = {
                    "version": v.version, "ref": v.ref, "serves": v.serves, "weight": v.weight,
                    "share": round(shares.get(v.version, 0.0), 4), "state": v.state,
                    "stable": v.version == release.stable,
                    "adapter_sha256": v.adapter_sha256, "tokenizer_sha256": v.tokenizer_sha256,
                    "max_price": {"prompt_per_mtok": v.max_price_prompt,
                                  "completion_per_mtok": v.max_price_completion},
                    "window": self._window(release, v.version).stats(now).as_dict(),
                    "note": self._notes.get((release.name, v.version), ""),
                }  # fmt: skip
                tally = self._shadows.get((release.name, v.version))
                if tally is not None:
                    item["shadow"] = {
                        **tally.window.stats(now).as_dict(), "compared": tally.compared,
                        "agreed": tally.agreed,
                    }  # fmt: skip
                versions.append(item)
            out.append({
                "name": release.name, "stable": release.stable, "sticky": release.sticky,
                "shadow": {"version": release.shadow_version, "share": release.shadow_share},
                "rollback": release.rollback.as_dict(), "versions": versions,
            })  # fmt: skip
        return out

    def describe_one(self, name: str) -> dict[str, Any]:
        self._existing(name)
        return next(r for r in self.describe() if r["name"] == name)

    async def create(
        self, name: str, versions: list[Version], stable: str, actor: str,
        rollback: RollbackPolicy | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        if "@" in name or not name.strip():
            raise InvalidRequest("A model name may not be empty or hold `@`.", param="name")
        async with self._changes:
            if name in self._releases:
                raise InvalidRequest(f"The model `{name}` exists; add versions to it.",
                                     param="name")  # fmt: skip
            names = [v.version for v in versions]
            if len(set(names)) != len(names) or stable not in names:
                raise InvalidRequest(
                    "Versions must have distinct names and include the stable one.",
                    param="versions",
                )
            for v in versions:
                self._check_version(v)
            versions = [dataclasses.replace(v, model=name, state=ACTIVE) for v in versions]
            if not any(v.weight for v in versions):  # the stable version takes everything
                versions = [dataclasses.replace(v, weight=100 if v.version == stable else 0)
                            for v in versions]  # fmt: skip
            release = Release(name, stable, tuple(versions), rollback=rollback or RollbackPolicy())
            await self._save(release, "created", stable, actor, {"versions": names})
        return self.describe_one(name)

    async def add_version(self, name: str, version: Version, actor: str) -> dict[str, Any]:
        async with self._changes:
            release = self._existing(name)
            if release.version(version.version) is not None:
                raise InvalidRequest(f"`{name}` already has a version `{version.version}`.",
                                     param="version")  # fmt: skip
            self._check_version(version)
            added = dataclasses.replace(version, model=name, weight=0, state=ACTIVE)
            changed = dataclasses.replace(release, versions=(*release.versions, added))
            await self._save(changed, "version_added", added.version, actor,
                             {"serves": added.serves})  # fmt: skip
        return self.describe_one(name)

    async def release(
        self, name: str, actor: str, *, weights: dict[str, int] | None = None,
        sticky: bool | None = None, shadow: tuple[str | None, float] | None = None,
        rollback: RollbackPolicy | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Change the release policy: weights (e.g. {"v1": 95, "v2": 5}; versions left out
        get 0, a version given weight is active again), stickiness, shadow, rollback rule."""
        async with self._changes:
            release = self._existing(name)
            changes: dict[str, dict[str, Any]] = {}
            if weights is not None:
                unknown = set(weights) - {v.version for v in release.versions}
                if unknown or any(w < 0 for w in weights.values()) or not sum(weights.values()):
                    raise InvalidRequest(
                        f"Weights must name versions of `{name}`, be ≥ 0 and not all 0"
                        + (f" (unknown: {', '.join(sorted(unknown))})." if unknown else "."),
                        param="weights",
                    )
                for v in release.versions:
                    weight = weights.get(v.version, 0)
                    changes[v.version] = {"weight": weight}
                    if weight > 0:
                        changes[v.version]["state"] = ACTIVE
                        self._windows.pop((name, v.version), None)  # a fresh judgement
            changed = _with_versions(release, changes)
            if sticky is not None:
                changed = dataclasses.replace(changed, sticky=sticky)
            if shadow is not None:
                version, share = shadow
                if version is not None and release.version(version) is None:
                    raise InvalidRequest(f"`{name}` has no version `{version}`.",
                                         param="shadow.version")  # fmt: skip
                if not 0 <= share <= 1:
                    raise InvalidRequest("A shadow share is between 0 and 1.",
                                         param="shadow.share")  # fmt: skip
                changed = dataclasses.replace(changed, shadow_version=version,
                                              shadow_share=share if version else 0.0)  # fmt: skip
                self._shadows.pop((name, version or ""), None)
            if rollback is not None:
                changed = dataclasses.replace(changed, rollback=rollback)
            detail = {"shares": changed.shares(), "sticky": changed.sticky,
                      "shadow": [changed.shadow_version, changed.shadow_share]}  # fmt: skip
            await self._save(changed, "released", "", actor, detail)
        return self.describe_one(name)

    async def promote(self, name: str, version: str, actor: str) -> dict[str, Any]:
        """`version` becomes the stable version and takes all the traffic."""
        async with self._changes:
            release = self._existing(name)
            if release.version(version) is None:
                raise NotFound(f"`{name}` has no version `{version}`.", param="version")
            changes: dict[str, dict[str, Any]] = {
                v.version: {"weight": 100 if v.version == version else 0} for v in release.versions
            }
            changes[version]["state"] = ACTIVE
            promoted = dataclasses.replace(_with_versions(release, changes), stable=version)
            await self._save(promoted, "promoted", version, actor,
                             {"previous_stable": release.stable})  # fmt: skip
        return self.describe_one(name)

    async def roll_back(
        self, name: str, actor: str, version: str | None = None, reason: str = "by hand"
    ) -> dict[str, Any]:
        """Take one version (or every version but the stable one) out of traffic."""
        async with self._changes:
            release = self._existing(name)
            if version is not None and release.version(version) is None:
                raise NotFound(f"`{name}` has no version `{version}`.", param="version")
            if version == release.stable:
                raise InvalidRequest(
                    f"`{version}` is the stable version of `{name}`: promote another first.",
                    param="version",
                )
            targets = [version] if version else [
                v.version for v in release.versions if v.version != release.stable
            ]  # fmt: skip
            changes = {v: {"weight": 0, "state": ROLLED_BACK} for v in targets}
            for v in targets:
                self._notes[(name, v)] = f"rolled back by {actor}: {reason}"
            changes.setdefault(release.stable, {})
            if not any(v.weight for v in release.versions if v.version not in targets):
                changes[release.stable]["weight"] = 100  # the stable version takes it all
            rolled = _with_versions(release, changes)
            await self._save(rolled, "rolled_back", version or "*", actor,
                             {"reason": reason, "versions": targets})  # fmt: skip
        if self._metrics:
            for v in targets:
                self._metrics.rollbacks.labels(name, v, "manual").inc()
        return self.describe_one(name)

    async def history(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        self._existing(name)
        await self.drain()  # an automatic rollback just decided is in the history
        return await asyncio.to_thread(releases_store.history, self._db, name, limit)

    def _check_version(self, version: Version) -> None:
        """A version's adapter is registered for the model it serves; a version that pins a
        tokenizer is metered with exactly that one."""
        if version.adapter_sha256 is not None:
            base = self._adapter_base_of(version.adapter_sha256)
            if base != version.serves:
                raise InvalidRequest(
                    f"Adapter {version.adapter_sha256} is not registered"
                    + (f" for `{version.serves}` (it applies to `{base}`)." if base else
                       " (POST /admin/v1/adapters first)."),
                    param="adapter_sha256",
                )  # fmt: skip
        pinned = version.tokenizer_sha256
        if pinned is None:
            return
        actual = self._tokenizer_of(version.serves)
        if actual != pinned:
            found = f"`{actual}`" if actual else "none (AGORA_COORDINATOR_TOKENIZERS)"
            raise InvalidRequest(
                f"Version `{version.version}` pins tokenizer {pinned}, but the coordinator "
                f"recounts `{version.serves}` with {found}.",
                param="tokenizer_sha256",
            )

    def _existing(self, name: str) -> Release:
        release = self._releases.get(name)
        if release is None:
            raise NotFound(f"No model `{name}` in the catalogue.", param="name")
        return release

    async def _save(
        self, release: Release, kind: str, version: str, actor: str, detail: dict[str, Any]
    ) -> None:
        await asyncio.to_thread(
            releases_store.save, self._db, release_to_row(release), kind=kind, version=version,
            actor=actor, detail=detail,
        )  # fmt: skip
        self._releases[release.name] = release
        self._generation += 1


def _target(version: Version, *, canary: bool = False) -> Target:
    return Target(version.serves, version.ref, version, canary)


def _with_versions(release: Release, changes: dict[str, dict[str, Any]]) -> Release:
    versions = tuple(
        dataclasses.replace(v, **changes[v.version]) if v.version in changes else v
        for v in release.versions
    )
    return dataclasses.replace(release, versions=versions)
