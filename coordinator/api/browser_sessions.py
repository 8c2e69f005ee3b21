"""Browser sessions for the dashboards, kept in the coordinator's memory (a restart signs
everyone out, which is the safe failure).

The operator signs in with the admin token; a provider proves it holds its node key by signing a
one-time challenge (`agora worker login` does it and prints a one-time link), so no password is
ever shared with a provider.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

COOKIE = "agora_session"

Role = Literal["operator", "provider"]


@dataclass(frozen=True)
class BrowserSession:
    role: Role
    node_id: str | None  # the provider's node; None for the operator
    expires_at: float


class BrowserSessions:
    def __init__(
        self,
        ttl_s: float = 12 * 3600,
        challenge_ttl_s: float = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl_s = ttl_s
        self._challenge_ttl_s = challenge_ttl_s
        self._clock = clock
        self._sessions: dict[str, BrowserSession] = {}
        self._challenges: dict[str, float] = {}  # challenge -> expiry
        self._links: dict[str, tuple[str, float]] = {}  # one-time link -> (node, expiry)

    def _prune(self) -> None:
        now = self._clock()
        self._sessions = {k: v for k, v in self._sessions.items() if v.expires_at > now}
        self._challenges = {k: v for k, v in self._challenges.items() if v > now}
        self._links = {k: v for k, v in self._links.items() if v[1] > now}

    def open(self, role: Role, node_id: str | None = None) -> str:
        self._prune()
        token = secrets.token_urlsafe(32)
        self._sessions[token] = BrowserSession(role, node_id, self._clock() + self._ttl_s)
        return token

    def get(self, token: str | None) -> BrowserSession | None:
        session = self._sessions.get(token or "")
        if session is None or session.expires_at <= self._clock():
            return None
        return session

    def close(self, token: str | None) -> None:
        self._sessions.pop(token or "", None)

    def challenge(self) -> str:
        self._prune()
        challenge = secrets.token_hex(32)
        self._challenges[challenge] = self._clock() + self._challenge_ttl_s
        return challenge

    def take_challenge(self, challenge: str) -> bool:
        """True once for a challenge this coordinator issued and that has not expired."""
        expiry = self._challenges.pop(challenge, None)
        return expiry is not None and expiry > self._clock()

    def link(self, node_id: str) -> str:
        """A one-time sign-in link token for a node that proved its key."""
        token = secrets.token_urlsafe(32)
        self._links[token] = (node_id, self._clock() + self._challenge_ttl_s)
        return token

    def redeem(self, link: str) -> str | None:
        node_id, expiry = self._links.pop(link, ("", 0.0))
        return node_id if node_id and expiry > self._clock() else None
