"""`agora bench routing`: what one routing decision costs as the market grows (100 to 100k
registered workers), for the default policy (sampled: power-of-k) and sort-by-price (the pool
is kept price-sorted, so it stops at the first eligible ones). Pure CPU, one process."""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.services.routing import Preferences, RouteRequest, route
from coordinator.services.stats import WorkerStats

console = Console()
REQUEST = RouteRequest("m", prompt_tokens=500, max_tokens=256)


@dataclass
class Offer:
    node_id: str
    price_prompt_per_mtok: int
    price_completion_per_mtok: int
    in_flight: int
    max_concurrency: int = 16
    engine_waiting: int = 0
    kv_cache_usage: float = 0.3
    available: bool = True
    adapters: frozenset[str] = frozenset()  # base models only here
    max_loras: int = 0
    adapter_price_prompt_per_mtok: int = 0
    adapter_price_completion_per_mtok: int = 0
    task: str = "generate"
    takes_batches: bool = True
    data_retention: str = ""  # declared in the advert
    region: str = ""

    @property
    def price_cached_prompt_per_mtok(self) -> int:  # no cached-prompt discount here
        return self.price_prompt_per_mtok


def market(size: int, rng: random.Random) -> tuple[list[Offer], dict[str, WorkerStats]]:
    offers = []
    for i in range(size):
        price = rng.randrange(50_000, 300_000)
        offers.append(Offer(f"node-{i:06d}", price // 2, price, rng.randrange(0, 17)))
    offers.sort(key=lambda o: (o.price_completion_per_mtok, o.price_prompt_per_mtok))
    stats = {}
    for offer in offers:
        measured = WorkerStats(ttft_s=rng.uniform(0.02, 0.5), itl_s=rng.uniform(0.005, 0.05))
        measured.successes = rng.uniform(0, 50)
        stats[offer.node_id] = measured
    return offers, stats


def _cost(size: int, prefs: Preferences, decisions: int, rng: random.Random) -> list[float]:
    pool, stats = market(size, rng)
    reputation = {o.node_id: rng.uniform(0.3, 0.99) for o in pool}
    samples = []
    for _ in range(decisions):
        started = time.perf_counter_ns()
        route(REQUEST, pool, stats, prefs, rng, 1000.0, reputation=reputation, price_sorted=True)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def routing(
    sizes: str = typer.Option("100,1000,10000,100000", help="Registered workers, comma-separated."),
    decisions: int = typer.Option(20_000, help="Decisions timed per size and mode."),
    out: Path = typer.Option(Path("bench/results/routing.json"), help="Results file (JSON)."),
) -> None:
    """Routing decision cost (µs) vs number of registered workers."""
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in sizes.split(",") if s.strip()]:
        for mode, prefs in (("default", Preferences()), ("sort=price", Preferences(sort="price"))):
            samples = sorted(_cost(size, prefs, decisions, random.Random(size)))
            rows.append({"workers": size, "mode": mode, "decisions": decisions,
                         "p50_us": samples[len(samples) // 2],
                         "p99_us": samples[int(len(samples) * 0.99)],
                         "mean_us": statistics.fmean(samples)})  # fmt: skip
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"Python {platform.python_version()}", "rows": rows}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("workers", "mode", "p50 (µs)", "p99 (µs)", "mean (µs)")
    for r in rows:
        table.add_row(f"{r['workers']:,}", r["mode"], f"{r['p50_us']:.1f}",
                      f"{r['p99_us']:.1f}", f"{r['mean_us']:.1f}")  # fmt: skip
    console.print(table)
    console.print(f"written to {out}")
