"""The exact response cache: a deterministic request (greedy, or a fixed seed) whose canonical
body, served model version and API key match an earlier answer is answered from memory, within
a TTL and a byte bound, without a worker.

Opt-in per request (`X-Agora-Cache: on`): an identical prompt does not always want an identical
answer. Keys are per API key unless the operator shares them (`response_cache_shared`): one
client's prompts and answers are never another's. Only what can be replayed exactly is cached:
one choice, no tools, no logprobs, no token ids.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

# body fields that change how an answer is delivered, not what it is
_DELIVERY = frozenset({"stream", "stream_options", "user", "provider", "models",
                       "return_token_ids"})  # fmt: skip
# fields whose answers cannot be replayed from text alone
_UNCACHEABLE = ("tools", "functions", "logprobs", "top_logprobs", "prompt_logprobs", "echo",
                "best_of")  # fmt: skip
ENTRY_OVERHEAD = 512  # bytes an entry costs beyond its pieces (key, record, its slot)
PIECE_OVERHEAD = 160  # a piece's tuple and its two str objects


@dataclass(frozen=True)
class CachedAnswer:
    """What a hit replays: the text as the client first got it, frame by frame (so a
    streamed hit has the same chunks as the miss), and what the miss was billed."""

    source_request_id: str
    endpoint: str
    pieces: tuple[tuple[str, str], ...]  # (text, finish_reason or "") per frame, in order
    prompt_tokens: int
    completion_tokens: int
    charged: int  # what the original request cost its client (micro-units)
    whole: dict[str, Any] | None = None  # the non-streamed answer, when the miss was one

    @property
    def text(self) -> str:
        return "".join(text for text, _finish in self.pieces)

    @property
    def finish_reason(self) -> str:
        return next((f for _t, f in reversed(self.pieces) if f), "stop")

    @property
    def size(self) -> int:
        """Bytes it holds, roughly: UTF-8 text, each piece's tuple and strings, and the whole
        answer's dict at about three times its JSON."""
        whole = 3 * len(_sorted_json(self.whole)) if self.whole is not None else 0
        pieces = sum(len(t.encode()) + PIECE_OVERHEAD for t, _f in self.pieces)
        return ENTRY_OVERHEAD + pieces + whole


def why_not_cacheable(body: dict[str, Any], choices: int, wants_token_ids: bool) -> str | None:
    """None when the request's answer is deterministic and replayable, else why not.
    `choices`: completions it asks for (`n`, times the prompts of a completions batch)."""
    temperature = body.get("temperature", 1.0)
    seeded = isinstance(body.get("seed"), int) and not isinstance(body.get("seed"), bool)
    if temperature != 0 and not seeded:
        return "not deterministic (needs temperature 0 or a seed)"
    if choices != 1:
        return "more than one choice"
    if any(body.get(name) is not None and body.get(name) is not False for name in _UNCACHEABLE):
        return "tools or logprobs"  # (logprobs: 0 still asks for the chosen token's)
    if wants_token_ids:
        return "token ids asked for"
    return None


def cache_key(scope: str, served: str, endpoint: str, body: dict[str, Any]) -> str:
    """SHA-256 of who may share the answer, the model version that served it, the endpoint
    and the canonical body (sorted keys; delivery-only fields dropped)."""
    kept = {k: v for k, v in body.items() if k not in _DELIVERY}
    material = _sorted_json({"scope": scope, "served": served, "endpoint": endpoint,
                             "body": kept})  # fmt: skip
    return hashlib.sha256(material).hexdigest()


def _sorted_json(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


class ResponseCache:
    """Least recently used answers, each kept at most `ttl_s`, all together at most
    `max_bytes` (an answer larger than that is not kept)."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, int, CachedAnswer]] = OrderedDict()  # LRU
        self._ages: OrderedDict[str, float] = OrderedDict()  # the same keys, oldest put first
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        found = self._entries.get(key)
        if found is not None and self._clock() - found[0] > self._ttl_s:
            self._drop(key)
            found = None
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found[2]

    def put(self, key: str, answer: CachedAnswer) -> None:
        size = answer.size
        if size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        now = self._clock()
        self._entries[key] = (now, size, answer)
        self.bytes += size
        self._ages[key] = now
        for oldest, at in list(self._ages.items()):  # expired ones leave first (oldest first)
            if now - at <= self._ttl_s:
                break
            self._drop(oldest)
        while self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _at, size, _answer = self._entries.pop(key)
        del self._ages[key]
        self.bytes -= size
