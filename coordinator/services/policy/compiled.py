"""A policy as stored (its JSON) and as run (its steps built): versioned by the SHA-256 of
its canonical JSON, which receipts and the audit log name instead of its content."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.services.policy.steps import (
    AFTER,
    INPUT,
    OUTPUT,
    ROUTING,
    PolicyError,
    ProviderConstraints,
    Step,
    build,
)

MAX_STEPS = 32


def canonical(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Policy:
    name: str
    version: int
    sha256: str
    spec: dict[str, Any]  # {"steps": [...]} as given
    steps: tuple[Step, ...]

    @classmethod
    def build(
        cls, name: str, version: int, spec: Mapping[str, Any],
        kinds: Mapping[str, type[Step]] | None = None,
    ) -> Policy:  # fmt: skip
        """Check and build a policy from its JSON; PolicyError says what is wrong."""
        if not isinstance(spec, Mapping) or set(spec) - {"steps", "description"}:
            raise PolicyError("a policy is a JSON object with `steps` (and a `description`)")
        raw = spec.get("steps")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_STEPS:
            raise PolicyError(f"`steps` must be a list of 1 to {MAX_STEPS} steps")
        steps = tuple(build(options, kinds) for options in raw)
        digest = hashlib.sha256(canonical(spec).encode()).hexdigest()
        policy = cls(name, version, digest, dict(spec), steps)
        policy.constraints()  # steps that no worker could satisfy together are refused here
        return policy

    @property
    def label(self) -> str:
        """`name@v3`, as headers show it."""
        return f"{self.name}@v{self.version}"

    def at(self, point: str) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if point in s.points())

    @property
    def changes_output(self) -> bool:
        """Whether the client's output may differ from the engine's (placeholders put back,
        text withheld): token ids and logprobs would then show what it holds back."""
        return bool(self.at(OUTPUT)) or any(
            getattr(s, "mode", "") == "placeholder" for s in self.at(INPUT)
        )

    def constraints(self) -> ProviderConstraints | None:
        found = [c for s in self.at(ROUTING) if (c := s.constraints()) is not None]
        if not found:
            return None
        retention = _intersect([c.data_retention for c in found])
        regions = _intersect([c.regions for c in found])
        floors = [c.min_reputation for c in found if c.min_reputation is not None]
        return ProviderConstraints(retention, regions, max(floors) if floors else None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "sha256": self.sha256,
            "steps": [{"kind": s.kind, "points": list(s.points())} for s in self.steps],
            "spec": self.spec,
        }  # fmt: skip

    @property
    def has_after(self) -> bool:
        return bool(self.at(AFTER))


def _intersect(sets: list[frozenset[str]]) -> frozenset[str]:
    """Every step's accepted values at once (an empty set accepts anything)."""
    given = [s for s in sets if s]
    if not given:
        return frozenset()
    out = given[0]
    for s in given[1:]:
        out &= s
    if not out:
        raise PolicyError("its providers steps accept no common value: no worker could serve it")
    return out
