"""An operator's own policy step, as a separate package would ship it: registered under the
`agora.policy_steps` entry points (tests/coordinator/test_policy_parts.py writes its
dist-info), it withholds shouted output: a run of `min_letters` capitals or more."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from coordinator.services.policy.steps import Block, PolicyError, Step


class Shouting(Step):
    kind: ClassVar[str] = "shouting"

    def __init__(self, min_letters: int = 6, **rest: Any) -> None:
        if rest:
            raise PolicyError(f"unknown options {sorted(rest)}")
        self._pattern = re.compile(rf"\b[A-Z]{{{min_letters},}}\b")
        self.hold_back = min_letters + 1

    def blocked_at(self, text: str) -> Block | None:
        found = self._pattern.search(text)
        return Block(found.start(), self.kind, "shouting") if found else None
