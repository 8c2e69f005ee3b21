"""One choice's output on its way to the client under a policy: placeholders put back, text
held back until no blocked match can still start in it, and the stop where one does.

Invariant: released text never contains the start of a match a step can see. Each step's
`hold_back` characters stay unreleased until more text (or the end) comes, so a phrase split
over several stream chunks is caught before its first character leaves. A placeholder split
over chunks waits whole before it is replaced."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from coordinator.services.policy.steps import Block, Step

_CONTEXT = 64  # released characters kept as context for rules that look behind


class OutputGate:
    def __init__(self, placeholders: Mapping[str, str], steps: Sequence[Step]) -> None:
        self._values = dict(placeholders)
        self._placeholder = (
            re.compile("|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True)))
            if placeholders
            else None
        )
        self._longest = max((len(p) for p in placeholders), default=0)
        self._steps = tuple(steps)
        self._hold = max((s.hold_back for s in steps), default=0)
        self._raw = ""  # model text waiting for the rest of a placeholder
        self._pending = ""  # shown text held back
        self._context = ""  # the end of what was released
        self.restored = 0  # placeholders put back
        self.shown: list[str] = []  # what was released, in order
        self.blocked: Block | None = None

    def feed(self, delta: str, final: bool = False) -> str:
        """The text the client may see now (everything once `final`); after a block, nothing."""
        if self.blocked is not None:
            return ""
        self._pending += self._restore(delta, final)
        if self._steps:
            found = self._first_block()
            if found is not None:
                cut = max(0, found.at - len(self._context))
                out, self._pending = self._pending[:cut], ""
                self.blocked = found
                self.shown.append(out)
                return out
        if final or not self._hold:
            out, self._pending = self._pending, ""
        elif len(self._pending) > self._hold:
            out, self._pending = self._pending[: -self._hold], self._pending[-self._hold :]
        else:
            out = ""
        if out:
            self._context = (self._context + out)[-_CONTEXT:]
            self.shown.append(out)
        return out

    def _restore(self, delta: str, final: bool) -> str:
        if self._placeholder is None:
            return delta
        text = self._raw + delta
        keep = 0 if final else self._partial_tail(text)
        ready, self._raw = (text[: len(text) - keep], text[len(text) - keep :])
        return self._placeholder.sub(self._put_back, ready)

    def _put_back(self, match: re.Match[str]) -> str:
        self.restored += 1
        return self._values[match.group()]

    def _partial_tail(self, text: str) -> int:
        """How many trailing characters may be the beginning of a placeholder."""
        start = text.rfind("[", max(0, len(text) - self._longest))
        if start < 0:
            return 0
        tail = text[start:]
        return len(tail) if any(p.startswith(tail) for p in self._values) else 0

    def _first_block(self) -> Block | None:
        window = self._context + self._pending
        found = [b for s in self._steps if (b := s.blocked_at(window)) is not None]
        return min(found, key=lambda b: b.at) if found else None
