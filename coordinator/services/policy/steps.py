"""The interface every policy step implements, and how steps are found (entry points).

A step is a class registered under the `agora.policy_steps` entry-point group; its name there
is the `kind` a policy's JSON names, and it is built with that JSON object's other fields:

    [project.entry-points."agora.policy_steps"]
    my_step = "my_package.module:MyStep"

It overrides what it needs: `on_input` (rewrite or refuse a prompt's text), `blocked_at` with
`hold_back` (find text the client must not see), `after` (look at a finished answer), or
`constraints` (which providers may run the request). Steps never keep raw values in `Hit`s:
hits are what the audit log and metrics show.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

GROUP = "agora.policy_steps"
INPUT, OUTPUT, AFTER, ROUTING = "input", "output", "after", "routing"


class PolicyError(Exception):
    """A policy (or one of its steps) that cannot be built from its JSON."""


class PolicyViolation(Exception):
    """A request a step refuses to pass on (the client gets a 400 naming the policy)."""

    def __init__(self, message: str, entities: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.entities = entities


@dataclass(frozen=True)
class Hit:
    """What a step did to one request: kinds and counts, never the values."""

    step: str  # the step's kind
    point: str  # INPUT, OUTPUT, AFTER or ROUTING
    entity: str  # e.g. "email", "phrase", or a classifier's label
    count: int
    action: str  # "placeholder", "mask", "reject", "restore", "block", "flag", ...

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "point": self.point, "entity": self.entity,
                "count": self.count, "action": self.action}  # fmt: skip


@dataclass
class Scope:
    """One request's state shared by its steps: the placeholders put into its prompt (and
    their original values, kept in memory only) and what the steps did."""

    placeholders: dict[str, str] = field(default_factory=dict)  # "[EMAIL_1]" -> original
    hits: list[Hit] = field(default_factory=list)

    def record(self, hit: Hit) -> None:
        self.hits.append(hit)


@dataclass(frozen=True)
class Block:
    """Where a step found text the client must not see, and why (no value)."""

    at: int  # offset of the first blocked character in the text the step was given
    step: str
    entity: str


@dataclass(frozen=True)
class ProviderConstraints:
    """Which workers may run a request: by what they declare in their signed advert."""

    data_retention: frozenset[str] = frozenset()  # accepted declarations (empty: any)
    regions: frozenset[str] = frozenset()  # accepted regions (empty: any)
    min_reputation: float | None = None


class Step:
    """The base of every step; a subclass overrides the points it works at."""

    kind: ClassVar[str] = ""
    # characters of output held back before release, so that a match split across stream
    # chunks is still caught before any of it reaches the client
    hold_back: int = 0

    def __init__(self, **options: Any) -> None:
        if options:
            raise PolicyError(f"step `{self.kind}` takes no options {sorted(options)}")

    def on_input(self, text: str, scope: Scope) -> str:
        """The prompt text as the provider may see it (raise PolicyViolation to refuse)."""
        return text

    def blocked_at(self, text: str) -> Block | None:
        """The first text the client must not see in `text` (output seen so far, windowed)."""
        return None

    def after(self, output: str, scope: Scope) -> None:
        """Look at a finished answer (it has reached the client: record, do not change)."""

    def constraints(self) -> ProviderConstraints | None:
        return None

    def points(self) -> tuple[str, ...]:
        """Where this step works, from what its class overrides."""
        cls = type(self)
        found = []
        if cls.on_input is not Step.on_input:
            found.append(INPUT)
        if cls.blocked_at is not Step.blocked_at:
            found.append(OUTPUT)
        if cls.after is not Step.after:
            found.append(AFTER)
        if cls.constraints is not Step.constraints:
            found.append(ROUTING)
        return tuple(found)


@functools.cache
def installed() -> Mapping[str, type[Step]]:
    """Every step kind installed (entry points, read once per process)."""
    kinds: dict[str, type[Step]] = {}
    for point in entry_points(group=GROUP):
        try:
            loaded = point.load()
        except Exception as exc:  # a broken plugin is named, not fatal to the others
            kinds[point.name] = _broken(point.name, exc)
            continue
        if isinstance(loaded, type) and issubclass(loaded, Step):
            kinds[point.name] = loaded
        else:
            kinds[point.name] = _broken(point.name, TypeError(f"{loaded!r} is not a Step"))
    return kinds


def build(options: Mapping[str, Any], kinds: Mapping[str, type[Step]] | None = None) -> Step:
    """A step from one entry of a policy's `steps` list."""
    found = installed() if kinds is None else kinds
    if not isinstance(options, Mapping) or not isinstance(options.get("kind"), str):
        raise PolicyError("each step is a JSON object with a string `kind`")
    kind = options["kind"]
    cls = found.get(kind)
    if cls is None:
        raise PolicyError(f"unknown step kind `{kind}` (installed: {', '.join(sorted(found))})")
    rest = {k: v for k, v in options.items() if k != "kind"}
    try:
        step = cls(**rest)
    except PolicyError:
        raise
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"step `{kind}`: {exc}") from exc
    if not step.kind:
        step.kind = kind  # type: ignore[misc]
    return step


def _broken(name: str, error: Exception) -> type[Step]:
    class Broken(Step):
        def __init__(self, **_options: Any) -> None:
            raise PolicyError(f"the step plugin `{name}` does not load: {error}")

    return Broken
