"""Per-key limits: requests per minute and tokens per minute, as token buckets.

Tokens are charged at admission as the request's upper bound (prompt bound + max_tokens), the
way OpenAI counts them, and the unused part is given back when the request ends. Buckets live
in this coordinator process (a key spread over several replicas gets each replica's budget).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import RateLimited


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / (self.capacity / 60.0)


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None  # requests per minute; None = unlimited
    tpm: int | None = None  # tokens per minute; None = unlimited


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, key: str, kind: str, capacity: int) -> _Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None or bucket.capacity != capacity:
            bucket = self._buckets[(key, kind)] = _Bucket(capacity, capacity, self._clock())
        bucket.refill(self._clock())
        return bucket

    def admit(self, key: str, limits: Limits, tokens: int) -> None:
        """Take one request and `tokens` from the key's buckets, or raise RateLimited."""
        checks = []
        if limits.rpm is not None:
            checks.append(("requests", self._bucket(key, "rpm", limits.rpm), 1.0))
        if limits.tpm is not None:
            if tokens > limits.tpm:
                raise RateLimited(
                    f"This request may use up to {tokens} tokens, more than this key's limit "
                    f"of {limits.tpm} tokens per minute; lower max_tokens.",
                    code="tokens_exceed_limit",
                )
            checks.append(("tokens", self._bucket(key, "tpm", limits.tpm), float(tokens)))
        for what, bucket, amount in checks:
            wait = bucket.wait_for(amount)
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for {what} per minute on this API key; retry in "
                    f"{math.ceil(wait)} s.",
                    retry_after_s=max(1, math.ceil(wait)),
                )
        for _what, bucket, amount in checks:
            bucket.level -= amount

    def refund_request(self, key: str, limits: Limits) -> None:
        """Give back the request taken at admission (it is tried again as another model, and
        counts once)."""
        if limits.rpm is not None:
            bucket = self._bucket(key, "rpm", limits.rpm)
            bucket.level = min(bucket.capacity, bucket.level + 1.0)

    def refund(self, key: str, limits: Limits, tokens: int) -> None:
        """Give back tokens charged at admission but not used."""
        if limits.tpm is not None and tokens > 0:
            bucket = self._bucket(key, "tpm", limits.tpm)
            bucket.level = min(bucket.capacity, bucket.level + tokens)
