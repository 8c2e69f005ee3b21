"""The demand board: what clients asked of the market and what it could not give them, per
model and GPU class, over sliding windows, beside the capacity online now. Providers read it
(`GET /v1/market`, `agora market`, gossip) to see where demand goes unmet and what it pays.

The request path reports here (served, unmet, waiting); nothing here reaches back. Counts go
into 10-second buckets kept for the longest window; a window's numbers are the sum of its
buckets, so they lag by at most one bucket. Clearing prices are the prices the workers that
served each request signed (what providers earn per 1M tokens; clients pay the fee on top)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.services.registry import Registry

BUCKET_S = 10  # (every number on the board is an integer: it is signed as canonical JSON)
WINDOWS_S = (60, 300, 3600)
PRICE_SAMPLES = 16  # per bucket and model: ~5,800 an hour for percentiles, bounded work
# a board is rebuilt at most every FRESH_S (any reader may ask: the API is public; a build
# over an hour of 25 req/s on 10 models took ~160 ms on a loaded 2-core machine), and kept
# at most STILL_S while nothing happened (capacity moves too)
FRESH_S = 5.0
STILL_S = 10.0
MAX_MODELS = 1000  # models on a board (served models only: names with workers)
UNMET = ("capacity", "price")  # 503 for lack of a free worker, max_price no worker meets


@dataclass
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unmet_capacity: int = 0
    unmet_price: int = 0
    waits: int = 0  # requests that queued for a slot before a worker took them
    wait_s: float = 0.0
    prices: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion)/1M
    by_gpu: dict[str, int] = field(default_factory=dict)  # GPU class -> requests served
    # of requests turned away for lack of capacity: what they would have paid at most per 1M
    # completion tokens (a sample, in worker prices), and how many set no max_price
    unmet_max_prices: list[int] = field(default_factory=list)
    unmet_unlimited: int = 0

    def add(self, other: _Counts) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.unmet_capacity += other.unmet_capacity
        self.unmet_price += other.unmet_price
        self.waits += other.waits
        self.wait_s += other.wait_s
        self.prices += other.prices
        self.unmet_max_prices += other.unmet_max_prices
        self.unmet_unlimited += other.unmet_unlimited
        for gpu, n in other.by_gpu.items():
            self.by_gpu[gpu] = self.by_gpu.get(gpu, 0) + n


def _pct(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class DemandBook:
    def __init__(
        self, registry: Registry, gpu_of: Callable[[str], str],
        clock: Callable[[], float] = time.time,
        reserves: Mapping[str, tuple[int, int]] | None = None,
        wanted_at: Callable[[str], int] = lambda _model: 50,
    ) -> None:  # fmt: skip
        self._registry = registry
        self._wanted_at = wanted_at  # queue depth from which a model is marked wanted
        self._reserves = reserves or {}  # the operator's lowest ask per model (worker prices)
        self._gpu_of = gpu_of  # a node's GPU class (overview.gpu_type of its connection)
        self._clock = clock
        self._buckets: deque[tuple[int, dict[str, _Counts]]] = deque()
        self._waiting: dict[str, int] = {}  # model -> requests waiting for a slot now
        self._changes = 0  # events since start: a board built after the last one is current
        self._built: tuple[float, int, dict[str, Any]] | None = None  # (when, changes, board)

    # ---------------------------------------------------------------- what happened
    def _bucket(self, model: str) -> _Counts:
        self._changes += 1
        index = int(self._clock() // BUCKET_S)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append((index, {}))
            oldest = index - int(max(WINDOWS_S) // BUCKET_S)
            while self._buckets and self._buckets[0][0] <= oldest:
                self._buckets.popleft()
        return self._buckets[-1][1].setdefault(model, _Counts())

    def served(
        self, model: str, node_id: str, prompt_tokens: int, completion_tokens: int,
        price: tuple[int, int], waited_s: float,
    ) -> None:  # fmt: skip
        counts = self._bucket(model)
        counts.requests += 1
        counts.prompt_tokens += prompt_tokens
        counts.completion_tokens += completion_tokens
        if waited_s > 0:
            counts.waits += 1
            counts.wait_s += waited_s
        if len(counts.prices) < PRICE_SAMPLES:
            counts.prices.append(price)
        gpu = self._gpu_of(node_id)
        counts.by_gpu[gpu] = counts.by_gpu.get(gpu, 0) + 1

    def unmet(self, model: str, reason: str, max_price: int | None = None) -> None:
        """A request no worker took: `capacity` (503) or `price` (max_price unmet), with
        what it would have paid at most per 1M completion tokens (in worker prices; None: it
        set no limit): a node pricing itself raises only toward what unmet demand pays."""
        counts = self._bucket(model)
        if reason != "capacity":
            counts.unmet_price += 1
            return
        counts.unmet_capacity += 1
        if max_price is None:
            counts.unmet_unlimited += 1
        elif len(counts.unmet_max_prices) < PRICE_SAMPLES:
            counts.unmet_max_prices.append(max_price)

    def waiting(self, model: str, delta: int) -> None:
        """A request began (+1) or ended (-1) waiting for a free slot of `model`."""
        self._changes += 1
        waiting = max(0, self._waiting.get(model, 0) + delta)
        if waiting:
            self._waiting[model] = waiting
        else:
            self._waiting.pop(model, None)

    # ---------------------------------------------------------------- the board
    def window(self, seconds: int) -> dict[str, _Counts]:
        since = int(self._clock() // BUCKET_S) - int(seconds // BUCKET_S)
        total: dict[str, _Counts] = {}
        for index, models in self._buckets:
            if index > since:
                for model, counts in models.items():
                    total.setdefault(model, _Counts()).add(counts)
        return total

    def board(self) -> dict[str, Any]:
        """Plain JSON: per model, each window's demand and prices, and capacity now. Built at
        most once per FRESH_S, and kept up to STILL_S while nothing happened."""
        now = self._clock()
        if self._built is not None:
            at, changes, built = self._built
            if now - at < FRESH_S or (changes == self._changes and now - at < STILL_S):
                return built
        built = self._build()
        self._built = (now, self._changes, built)
        return built

    def _build(self) -> dict[str, Any]:
        capacity = self._capacity()
        windows = {f"{s}s": self.window(s) for s in WINDOWS_S}
        models = sorted(
            set(capacity) | {m for w in windows.values() for m in w} | set(self._waiting)
        )[:MAX_MODELS]  # fmt: skip
        out: dict[str, Any] = {}
        for model in models:
            prompt, completion = self._reserves.get(model, (0, 0))
            depth = self._waiting.get(model, 0)
            out[model] = {
                "queue_depth": depth,
                "wanted": depth >= self._wanted_at(model),  # providers: load it
                "reserve": {"prompt": prompt, "completion": completion},
                "capacity": capacity.get(model, _empty_capacity()),
                "windows": {
                    name: _describe(w.get(model), int(name[:-1])) for name, w in windows.items()
                },
            }
        return {"bucket_s": BUCKET_S, "models": out}

    def _capacity(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for model, pool in self._registry.models().items():
            up = [s for s in pool if s.available]
            total = sum(s.max_concurrency for s in up)
            in_use = sum(min(s.in_flight, s.max_concurrency) for s in up)
            by_gpu: dict[str, dict[str, int]] = {}
            for s in up:
                row = by_gpu.setdefault(self._gpu_of(s.node_id), {"workers": 0, "slots": 0,
                                                                  "in_use": 0})  # fmt: skip
                row["workers"] += 1
                row["slots"] += s.max_concurrency
                row["in_use"] += min(s.in_flight, s.max_concurrency)
            asks = sorted(s.offer.price_completion_per_mtok for s in up)
            out[model] = {
                "workers": len(up), "slots": total, "in_use": in_use,
                "utilisation_bps": in_use * 10_000 // total if total else None,
                "by_gpu": by_gpu, "ask_completion_min": asks[0] if asks else None,
                "ask_completion_median": asks[len(asks) // 2] if asks else None,
            }  # fmt: skip
        return out


def _empty_capacity() -> dict[str, Any]:
    return {"workers": 0, "slots": 0, "in_use": 0, "utilisation_bps": None, "by_gpu": {},
            "ask_completion_min": None, "ask_completion_median": None}  # fmt: skip


def _describe(counts: _Counts | None, seconds: int) -> dict[str, Any]:
    c = counts or _Counts()
    prompt = [p for p, _ in c.prices]
    completion = [q for _, q in c.prices]
    asked = c.requests + c.unmet_capacity + c.unmet_price
    return {
        "window_s": seconds,
        "requests": c.requests,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "unmet": {"capacity": c.unmet_capacity, "price": c.unmet_price},
        # what the requests turned away for capacity would have paid at most (worker prices,
        # per 1M completion tokens; those with no max_price counted apart)
        "unmet_max_price": {
            "p50": _pct(c.unmet_max_prices, 0.5),
            "unlimited": c.unmet_unlimited,
        },
        "unmet_share_bps": (asked - c.requests) * 10_000 // asked if asked else 0,
        "queued": c.waits,
        "mean_wait_ms": round(c.wait_s * 1000 / c.waits) if c.waits else None,
        "served_by_gpu": dict(sorted(c.by_gpu.items())),
        "clearing_price": {
            "prompt": _percentiles(prompt),
            "completion": _percentiles(completion),
        },
    }


def _percentiles(values: Iterable[int]) -> dict[str, int | None]:
    listed = list(values)
    return {"p10": _pct(listed, 0.1), "p50": _pct(listed, 0.5), "p90": _pct(listed, 0.9)}
