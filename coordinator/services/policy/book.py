"""Which policy each request runs: policies by name (their newest version), attached to API
keys and clients (a key's own wins), kept in memory and re-read from the database every few
seconds so replicas agree; what policies did is written to the audit log and the metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from coordinator.errors import InvalidRequest, NotFound, PermissionDenied
from coordinator.services.accounts import Principal
from coordinator.services.policy.compiled import Policy, canonical
from coordinator.services.policy.run import PolicyRun
from coordinator.services.policy.steps import PolicyError, Step
from coordinator.store import policies_store
from coordinator.store.db import Engine

log = logging.getLogger("agora.coordinator.policy")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def key_subject(key_id: int) -> str:
    return f"key:{key_id}"


def client_subject(client: str) -> str:
    return f"client:{client}"


class PolicyBook:
    def __init__(
        self,
        engine: Engine,
        *,
        refresh_s: float = 5.0,  # how long a change made on another replica may take here
        kinds: Mapping[str, type[Step]] | None = None,  # step kinds (default: entry points)
        actor: str = "admin-api",
        on_hit: Any = None,  # (policy, step, entity, action, count) -> None: metrics
    ) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._kinds = kinds
        self._actor = actor
        self._on_hit = on_hit
        self._policies: dict[str, Policy] = {}
        self._broken: dict[str, str] = {}  # name -> why its steps do not build here
        self._attached: dict[str, str] = {}  # subject -> policy name
        self._loaded_at = 0.0
        self._refreshing = False
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- reading
    def load(self) -> None:
        """Read every policy and attachment (at start, and after each change made here).
        One reader at a time, each reading after the one before: the newest read wins."""
        with self._lock:
            stored, attached = policies_store.snapshot(self._engine)
            policies: dict[str, Policy] = {}
            broken: dict[str, str] = {}
            for one in stored:
                try:
                    policies[one.name] = Policy.build(one.name, one.version, one.spec, self._kinds)
                except PolicyError as exc:  # e.g. its plugin is not installed on this replica
                    broken[one.name] = str(exc)
                    log.error("policy %s cannot run here: %s", one.name, exc)
            self._policies, self._broken, self._attached = policies, broken, attached
            self._loaded_at = time.monotonic()

    def fresh(self) -> None:
        """Re-read if the last read is older than the refresh interval."""
        if time.monotonic() - self._loaded_at >= self._refresh_s:
            self.load()

    def _maybe_refresh(self) -> None:
        if self._refreshing or time.monotonic() - self._loaded_at < self._refresh_s:
            return
        self._refreshing = True

        async def refresh() -> None:
            try:
                await asyncio.to_thread(self.load)
            except Exception:
                log.exception("could not re-read policies")
            finally:
                self._refreshing = False

        try:
            asyncio.get_running_loop().create_task(refresh())
        except RuntimeError:  # no loop (a CLI): read now
            self._refreshing = False
            self.load()

    def for_principal(self, principal: Principal) -> PolicyRun | None:
        """A run of the policy this key (or else its client) has, or None."""
        self._maybe_refresh()
        if not self._attached:
            return None
        name = self._attached.get(key_subject(principal.key_id)) or self._attached.get(
            client_subject(principal.client)
        )
        if name is None:
            return None
        policy = self._policies.get(name)
        if policy is None:  # fail closed: a request never runs without its policy
            why = self._broken.get(name, "it does not exist")
            raise PermissionDenied(
                f"Your key's policy `{name}` cannot run on this coordinator ({why}); "
                "ask the operator.", code="policy_unavailable",
            )  # fmt: skip
        return PolicyRun(policy)

    def describe(self) -> list[dict[str, Any]]:
        attached: dict[str, list[str]] = {}
        for subject, name in sorted(self._attached.items()):
            attached.setdefault(name, []).append(subject)
        out = [{**p.describe(), "attached": attached.get(n, [])}
               for n, p in sorted(self._policies.items())]  # fmt: skip
        out += [{"name": n, "error": why, "attached": attached.get(n, [])}
                for n, why in sorted(self._broken.items())]  # fmt: skip
        return out

    def version(self, sha256: str) -> dict[str, Any] | None:
        """A stored version by the SHA-256 receipts carry (old versions included)."""
        found = policies_store.by_sha256(self._engine, sha256)
        if found is None:
            return None
        return {"name": found.name, "version": found.version, "sha256": found.sha256,
                "spec": found.spec}  # fmt: skip

    # ---------------------------------------------------------------- changes
    def save(self, name: str, spec: dict[str, Any]) -> tuple[Policy, bool]:
        """Check a policy's JSON by building it, then store it as the name's next version."""
        if not _NAME.match(name):
            raise InvalidRequest("policy names use letters, digits and _ . - (max 100)",
                                 param="name")  # fmt: skip
        try:
            built = Policy.build(name, 0, spec, self._kinds)
        except PolicyError as exc:
            raise InvalidRequest(f"Policy `{name}`: {exc}", param="steps",
                                 code="invalid_policy") from exc  # fmt: skip
        version, new = policies_store.save(
            self._engine, name, canonical(spec), built.sha256, self._actor
        )
        self.load()
        return dataclasses.replace(built, version=version), new

    def attach(self, name: str | None, *, key_id: int | None = None,
               client: str | None = None) -> str:  # fmt: skip
        """Attach a policy to a key or a client (None: detach); the subject it applies to."""
        if (key_id is None) == (client is None):
            raise InvalidRequest("give either key_id or client", param="key_id")
        subject = key_subject(key_id) if key_id is not None else client_subject(str(client))
        if name is not None and name not in self._policies:
            self.load()
            if name not in self._policies:
                raise NotFound(f"No policy named `{name}`.", param="name")
        policies_store.attach(self._engine, subject, name, self._actor)
        self.load()
        return subject

    # ---------------------------------------------------------------- what policies did
    def record(self, principal: Principal, request_id: str, run: PolicyRun) -> None:
        """Write what the steps did to one request (kinds and counts only) to the audit log
        and the metrics. Blocking (a database write): run it off the event loop."""
        hits = run.hits()
        if not hits:
            return
        if self._on_hit is not None:
            for hit in hits:
                self._on_hit(run.policy.name, hit.step, hit.entity, hit.action, hit.count)
        detail = {
            "request_id": request_id, "key_id": principal.key_id, "policy": run.policy.name,
            "version": run.policy.version, "sha256": run.policy.sha256,
            "hits": [h.as_dict() for h in hits],
        }  # fmt: skip
        policies_store.record_hits(self._engine, client_subject(principal.client), detail)

    def hits_summary(self, limit: int = 2000) -> dict[str, Any]:
        """The newest policy actions, counted by policy, step, entity and action (dashboard)."""
        recent = policies_store.recent_hits(self._engine, limit)
        counts: Counter[tuple[str, str, str, str]] = Counter()
        requests: Counter[str] = Counter()
        for event in recent:
            requests[str(event.get("policy"))] += 1
            for hit in event.get("hits") or ():
                counts[(str(event.get("policy")), hit["step"], hit["entity"], hit["action"])] += (
                    int(hit["count"])
                )
        return {
            "requests": dict(requests),
            "hits": [
                {"policy": p, "step": s, "entity": e, "action": a, "count": n}
                for (p, s, e, a), n in counts.most_common()
            ],
            "latest": recent[:20],
        }
