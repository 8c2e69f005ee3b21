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
_LOOK_BEHIND = 8  # characters before a step's window it is shown (word boundaries, …)


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
        new = delta if self._placeholder is None else self._restore(delta, final)
        self._pending += new
        if self._steps and (new or final):
            found = self._first_block(len(new))
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
        assert self._placeholder is not None
        text = self._raw + delta if self._raw else delta
        keep = 0 if final or "[" not in text else self._partial_tail(text)
        if keep:
            text, self._raw = text[:-keep], text[-keep:]
        else:
            self._raw = ""
        return self._placeholder.sub(self._put_back, text) if "[" in text else text

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

    def _first_block(self, new: int) -> Block | None:
        """The earliest match that takes in some of the `new` characters: each step sees the
        end of the text, as far back as its own window (and a little context) reaches;
        matches without new characters were looked for before."""
        window = self._context + self._pending
        found: Block | None = None
        for step in self._steps:
            start = max(0, len(window) - new - step.hold_back - _LOOK_BEHIND)
            hit = step.blocked_at(window[start:] if start else window)
            if hit is not None and (found is None or hit.at + start < found.at):
                found = Block(hit.at + start, hit.step, hit.entity)
        return found
