"""The built-in steps: `pii` (redact before the model), `block` (withhold output), `flag`
(count matches after completion) and `providers` (who may run the request). Registered through
the same entry points as any plugin (pyproject.toml)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

from coordinator.services.policy import pii
from coordinator.services.policy.steps import (
    AFTER,
    INPUT,
    Block,
    Hit,
    PolicyError,
    PolicyViolation,
    ProviderConstraints,
    Scope,
    Step,
)

MODES = ("mask", "placeholder", "reject")
DEFAULT_WINDOW = 64  # characters of output a regex rule is checked over before release


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"`{name}` must be a list of non-empty strings")
    return tuple(value)


class PiiStep(Step):
    """Personal data and secrets out of the prompt: replaced by `[EMAIL]` (mask), by numbered
    placeholders the output gets the values back in (placeholder), or the request refused."""

    kind: ClassVar[str] = "pii"

    def __init__(self, mode: str = "placeholder", entities: Sequence[str] = pii.KINDS) -> None:
        if mode not in MODES:
            raise PolicyError(f"pii mode must be one of {', '.join(MODES)}")
        unknown = set(_strings("entities", list(entities))) - set(pii.KINDS)
        if unknown:
            raise PolicyError(f"unknown pii entities {sorted(unknown)} (known: {pii.KINDS})")
        self.mode = mode
        self.entities = tuple(entities)

    def on_input(self, text: str, scope: Scope) -> str:
        spans = pii.find(text, self.entities)
        if not spans:
            return text
        counts = Counter(s.kind for s in spans)
        if self.mode == "reject":
            kinds = tuple(sorted(counts))
            for kind in kinds:
                scope.record(Hit(self.kind, INPUT, kind, counts[kind], "reject"))
            raise PolicyViolation(f"the prompt contains {', '.join(kinds)}", kinds)
        out: list[str] = []
        last = 0
        for span in spans:
            value = text[span.start : span.end]
            out += [text[last : span.start], self._replacement(span.kind, value, text, scope)]
            last = span.end
        out.append(text[last:])
        for kind, count in sorted(counts.items()):
            scope.record(Hit(self.kind, INPUT, kind, count, self.mode))
        return "".join(out)

    def _replacement(self, kind: str, value: str, text: str, scope: Scope) -> str:
        label = kind.upper()
        if self.mode == "mask":
            return f"[{label}]"
        for placeholder, original in scope.placeholders.items():
            if original == value and placeholder.startswith(f"[{label}_"):
                return placeholder  # the same value, the same placeholder
        n = 1
        while f"[{label}_{n}]" in scope.placeholders or f"[{label}_{n}]" in text:
            n += 1  # never one taken, nor one the client itself wrote
        placeholder = f"[{label}_{n}]"
        scope.placeholders[placeholder] = value
        return placeholder


_GAP = 3  # whitespace characters a phrase's words may be apart (a bound: see hold_back)


class _Rules:
    """Deny-list phrases (case-insensitive; words 1 to _GAP whitespace characters apart) and
    regular expressions."""

    def __init__(self, phrases: Sequence[str], patterns: Sequence[str], window: int) -> None:
        if any(not p.split() for p in phrases):
            raise PolicyError("a phrase must have at least one word")

        def alternatives(lower: bool) -> str:
            return "|".join(
                rf"\s{{1,{_GAP}}}".join(
                    re.escape(w.lower() if lower else w) for w in phrase.split()
                )
                for phrase in phrases
            )

        self.phrases = re.compile(alternatives(False), re.IGNORECASE) if phrases else None
        # the same over lower-cased text: a case-insensitive alternation is ~6x slower
        self._lowered = re.compile(alternatives(True)) if phrases else None
        try:
            self.patterns = [re.compile(p) for p in patterns]
        except re.error as exc:
            raise PolicyError(f"a pattern does not compile: {exc}") from exc
        # the longest text a phrase can match, less one: held back, no match can start unseen
        longest = max(
            (sum(len(w) for w in p.split()) + _GAP * (len(p.split()) - 1) for p in phrases),
            default=0,
        )
        self.hold_back = max(longest - 1, window if patterns else 0)

    def first(self, text: str) -> tuple[int, str] | None:
        found: list[tuple[int, str]] = []
        if self.phrases is not None and self._lowered is not None:
            lowered = text.lower()  # same offsets unless lower-casing changed a length
            m = (self._lowered if len(lowered) == len(text) else self.phrases).search(
                lowered if len(lowered) == len(text) else text
            )
            if m:
                found.append((m.start(), "phrase"))
        for pattern in self.patterns:
            if m := pattern.search(text):
                found.append((m.start(), "pattern"))
        return min(found) if found else None

    def count(self, text: str) -> Counter[str]:
        counts: Counter[str] = Counter()
        if self.phrases is not None:
            counts["phrase"] += sum(1 for _ in self.phrases.finditer(text))
        for pattern in self.patterns:
            counts["pattern"] += sum(1 for _ in pattern.finditer(text))
        return counts


class BlockStep(Step):
    """Output the client must never see: the answer stops before it (`content_filter`).
    A regular expression is caught when its match fits in `window` characters."""

    kind: ClassVar[str] = "block"

    def __init__(
        self, phrases: Sequence[str] = (), patterns: Sequence[str] = (),
        window: int = DEFAULT_WINDOW,
    ) -> None:  # fmt: skip
        phrases, patterns = _strings("phrases", list(phrases)), _strings("patterns", list(patterns))
        if not phrases and not patterns:
            raise PolicyError("a block step needs `phrases` or `patterns`")
        if not isinstance(window, int) or not 1 <= window <= 4096:
            raise PolicyError("`window` must be an integer from 1 to 4096")
        self._rules = _Rules(phrases, patterns, window)
        self.hold_back = self._rules.hold_back

    def blocked_at(self, text: str) -> Block | None:
        found = self._rules.first(text)
        return Block(found[0], self.kind, found[1]) if found else None


class FlagStep(Step):
    """Count phrases or patterns in finished answers (audit and metrics; nothing changes)."""

    kind: ClassVar[str] = "flag"

    def __init__(self, phrases: Sequence[str] = (), patterns: Sequence[str] = ()) -> None:
        phrases, patterns = _strings("phrases", list(phrases)), _strings("patterns", list(patterns))
        if not phrases and not patterns:
            raise PolicyError("a flag step needs `phrases` or `patterns`")
        self._rules = _Rules(phrases, patterns, 0)

    def after(self, output: str, scope: Scope) -> None:
        for entity, count in sorted(self._rules.count(output).items()):
            if count:
                scope.record(Hit(self.kind, AFTER, entity, count, "flag"))


class ProvidersStep(Step):
    """Only workers whose signed advert declares an accepted data-retention policy, an
    accepted region, and (measured here) at least a reputation."""

    kind: ClassVar[str] = "providers"

    def __init__(
        self, data_retention: Sequence[str] = (), regions: Sequence[str] = (),
        min_reputation: float | None = None,
    ) -> None:  # fmt: skip
        retention = _strings("data_retention", list(data_retention))
        region_list = _strings("regions", list(regions))
        if min_reputation is not None and (
            not isinstance(min_reputation, int | float) or not 0 <= min_reputation <= 1
        ):
            raise PolicyError("`min_reputation` must be a number from 0 to 1")
        if not retention and not region_list and min_reputation is None:
            raise PolicyError("a providers step needs data_retention, regions or min_reputation")
        self._constraints = ProviderConstraints(
            frozenset(retention), frozenset(region_list),
            float(min_reputation) if min_reputation is not None else None,
        )  # fmt: skip

    def constraints(self) -> ProviderConstraints:
        return self._constraints
