"""Metrics of a simulated run, the oracle lower bound, and plots a person can read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.fleet import CATALOGUE, SimWorker
from simulations.market import Run
from simulations.workload import SimRequest

WARMUP_SHARE = 0.2  # arrivals in the first 20% of the run are not measured (empty fleet)


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def gini(values: Sequence[float]) -> float:
    """0 = everyone earned the same, 1 = one provider earned everything."""
    ordered = sorted(values)
    total = sum(ordered)
    if not ordered or total == 0:
        return 0.0
    weighted = sum((i + 1) * v for i, v in enumerate(ordered))
    return (2 * weighted) / (len(ordered) * total) - (len(ordered) + 1) / len(ordered)


def metrics(run: Run) -> dict[str, Any]:
    start = WARMUP_SHARE * run.duration_s
    measured = [o for o in run.outcomes if start <= o.arrival_s <= run.duration_s]
    served = [o for o in measured if o.e2e_s is not None]
    ttft = [o.ttft_s for o in served if o.ttft_s is not None]
    e2e = [o.e2e_s for o in served if o.e2e_s is not None]
    tokens = sum(o.tokens for o in served)
    honest = [w for w in run.fleet if not w.cheater]
    slots = sum(w.gpu.slots for w in honest)
    return {
        "policy": run.policy,
        "workers": run.workers,
        "requests": len(measured),
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "e2e_p50_s": _pct(e2e, 0.5),
        "e2e_p99_s": _pct(e2e, 0.99),
        "usd_per_mtok": (sum(o.cost for o in served) / tokens) if tokens else None,
        "failure_rate": 1 - len(served) / len(measured) if measured else 0.0,
        "bad_output_rate": sum(o.bad for o in served) / len(served) if served else 0.0,
        "utilization": sum(w.busy_s for w in honest) / (slots * run.duration_s) if slots else 0.0,
        "earnings_gini": gini([w.earned for w in honest]),
        "idle_providers": sum(w.served == 0 for w in honest) / len(honest) if honest else 0.0,
        "cheaters_quarantined": sum(w.quarantined for w in run.fleet if w.cheater),
        "cheaters": sum(w.cheater for w in run.fleet),
        # prompt tokens found in the serving engine's prefix cache (multi-turn workloads)
        "cached_prompt_share": (
            sum(o.cached_tokens for o in served) / max(1, sum(o.prompt_tokens for o in served))
        ),
    }


def oracle(fleet: list[SimWorker], arrivals: list[SimRequest], duration_s: float) -> dict[str, Any]:
    """A lower bound no policy can beat: every request on the nearest link, the fastest GPU
    and the cheapest honest price at once, with no queueing (not achievable together)."""
    start = WARMUP_SHARE * duration_s
    measured = [r for r in arrivals if start <= r.arrival_s <= duration_s]
    rtt = min(w.rtt_s for w in fleet)
    fastest = max(CATALOGUE, key=lambda g: g.prefill_tok_s)
    quickest_itl = min(g.itl_s for g in CATALOGUE)
    honest = [w for w in fleet if not w.cheater]
    cheapest = min(honest, key=lambda w: w.price_completion_per_mtok)
    ttft = [rtt + r.prompt_tokens / fastest.prefill_tok_s for r in measured]
    e2e = [
        t + quickest_itl * max(0, r.output_tokens - 1) for t, r in zip(ttft, measured, strict=True)
    ]
    cost = sum(
        (r.prompt_tokens * cheapest.price_prompt_per_mtok
         + r.output_tokens * cheapest.price_completion_per_mtok) // 1_000_000
        for r in measured
    )  # fmt: skip
    tokens = sum(r.prompt_tokens + r.output_tokens for r in measured)
    return {
        "policy": "oracle (bound)", "workers": len(fleet), "requests": len(measured),
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
        "e2e_p50_s": _pct(e2e, 0.5), "e2e_p99_s": _pct(e2e, 0.99),
        "usd_per_mtok": cost / tokens if tokens else None, "failure_rate": 0.0,
        "bad_output_rate": 0.0, "utilization": None, "earnings_gini": None,
        "idle_providers": None, "cheaters_quarantined": None, "cheaters": None,
    }  # fmt: skip


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per metric: policies side by side, one group of bars per fleet size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["workers"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    charts = [
        ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
        ("e2e_p99_s", "end-to-end p99 (s)"), ("usd_per_mtok", "cost (USD per 1M tokens)"),
        ("failure_rate", "client-visible failure rate"),
        ("bad_output_rate", "made-up output served"),
        ("utilization", "provider utilisation"), ("earnings_gini", "earnings spread (Gini)"),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    width = 0.8 / len(policies)
    for ax, (key, title) in zip(axes.flat, charts, strict=True):
        for i, policy in enumerate(policies):
            values = []
            for size in sizes:
                row = next((r for r in rows if r["workers"] == size and r["policy"] == policy), {})
                values.append(row.get(key) or 0.0)
            ax.bar([j + i * width for j in range(len(sizes))], values, width, label=policy)
        ax.set_title(title)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(sizes))])
        ax.set_xticklabels([f"{s:,} workers" for s in sizes])
    axes.flat[0].legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "policies.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
