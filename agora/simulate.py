"""`agora simulate`: the market at 1k to 100k simulated workers, routing policies compared on the
same seeded workload (SimPy, driving the coordinator's real routing code for `agora`)."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from simulations.demand_shift import MODES as DEMAND_MODES
from simulations.demand_shift import simulate_demand
from simulations.fleet import make_fleet
from simulations.market import simulate as run_market
from simulations.policies import DEFAULT_POLICIES, POLICIES
from simulations.release import ReleaseScenario, simulate_release
from simulations.report import metrics, oracle, plot
from simulations.workload import mean_job_tokens, requests

console = Console()


def arrival_rate(fleet_slots: int, utilization: float, prefill_s: float, decode_s: float) -> float:
    """Requests per second that keep `utilization` of the fleet's slots busy."""
    return utilization * fleet_slots / (prefill_s + decode_s)


def simulate(
    workers: str = typer.Option("1000,10000", help="Fleet sizes, comma-separated."),
    policies: str = typer.Option(",".join(DEFAULT_POLICIES), help="Policies, comma-separated."),
    duration: str = typer.Option(
        "60", help="Simulated seconds of arrivals per run: one value, or one per fleet size."
    ),
    utilization: float = typer.Option(0.6, help="Offered load as a share of fleet slots."),
    seed: int = typer.Option(1, help="Seed of the fleet and the workload."),
    out: Path = typer.Option(Path("bench/results/simulation"), help="Results folder."),
    scenario: str = typer.Option(
        "routing", help="routing: policies compared; release: a bad canary, with and without "
        "automatic rollback; demand: demand shifting between models, under fixed configs, "
        "price discovery, and price discovery with nodes that change model.",
    ),
    canary: float = typer.Option(0.05, help="release: the candidate's share of requests."),
    fail_rate: float = typer.Option(0.2, help="release: the share of its jobs a bad build fails."),
    conversations: bool = typer.Option(
        False, help="routing: chat requests are mostly next turns of conversations (prefix "
        "caches matter; compare agora with agora-no-cache).",
    ),
) -> None:  # fmt: skip
    """Compare routing policies on the same seeded market (table, JSON and PNG plots), or play
    a model release (`--scenario release`)."""
    if scenario == "release":
        release_report(workers, duration, utilization, seed, out, canary, fail_rate)
        return
    if scenario == "demand":
        demand_report(workers, duration, utilization, seed, out)
        return
    if scenario != "routing":
        raise typer.BadParameter("--scenario is routing, release or demand")
    sizes = [int(s) for s in workers.split(",") if s.strip()]
    spans = [float(d) for d in duration.split(",") if d.strip()]
    if len(spans) not in (1, len(sizes)):
        raise typer.BadParameter("give one duration, or one per fleet size")
    durations = dict(zip(sizes, spans * len(sizes) if len(spans) == 1 else spans, strict=False))
    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = set(names) - set(POLICIES)
    if unknown:
        raise typer.BadParameter(f"unknown policies {sorted(unknown)}; known: {list(POLICIES)}")
    rows: list[dict[str, Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as progress:  # fmt: skip
        for size in sizes:
            span = durations[size]
            probe = make_fleet(size, random.Random(seed))
            prompt, output = mean_job_tokens()
            prefill = statistics.fmean(prompt / w.gpu.prefill_tok_s for w in probe)
            decode = statistics.fmean(output * w.gpu.itl_s * 1.3 for w in probe)
            slots = sum(w.gpu.slots for w in probe)
            rate = arrival_rate(slots, utilization, prefill, decode)
            arrivals = list(requests(rate, span, random.Random(seed + 1), conversations))
            rows.append({**oracle(probe, arrivals, span), "duration_s": span})
            for name in names:
                fleet = make_fleet(size, random.Random(seed))  # the same fleet, fresh state
                policy = POLICIES[name](fleet, random.Random(seed + 2))
                task = progress.add_task(f"{size:>7,} workers · {name:<15}", total=span)
                started = time.perf_counter()

                def advance(now: float, task: TaskID = task) -> None:
                    progress.update(task, completed=now)

                run = run_market(fleet, policy, arrivals, span, seed + 3, on_progress=advance)
                progress.update(task, completed=span)
                row = metrics(run)
                row["rate_per_s"] = rate
                row["duration_s"] = span
                row["wall_s"] = time.perf_counter() - started
                rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"seed": seed, "utilization": utilization, "rows": rows},
        indent=2) + "\n")  # fmt: skip
    charts = plot(rows, out)
    table = Table("workers", "policy", "requests", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99",
                  "USD/1M tok", "failed", "made-up", "util", "Gini", "cached")  # fmt: skip

    def f(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for r in rows:
        table.add_row(f"{r['workers']:,}", r["policy"], f"{r['requests']:,}",
                      f(r["ttft_p50_s"], ".3f"), f(r["ttft_p99_s"], ".3f"),
                      f(r["e2e_p50_s"], ".2f"), f(r["e2e_p99_s"], ".2f"),
                      f(r["usd_per_mtok"], ".4f"), f(r["failure_rate"], ".2%"),
                      f(r["bad_output_rate"], ".2%"), f(r["utilization"], ".0%"),
                      f(r["earnings_gini"], ".2f"),
                      f(r.get("cached_prompt_share"), ".1%"))  # fmt: skip
    console.print(table)
    console.print(f"written: {out / 'results.json'}, {', '.join(map(str, charts))}")


def release_report(
    workers: str, duration: str, utilization: float, seed: int, out: Path, canary: float,
    fail_rate: float,
) -> None:  # fmt: skip
    """A bad candidate at a canary share: what it fails before the rollback rule acts, how
    long that takes, against the same traffic with no rollback."""
    scenario = ReleaseScenario(canary_share=canary, candidate_fail_rate=fail_rate)
    rows = []
    span = float(duration.split(",")[0])
    for size in [int(s) for s in workers.split(",") if s.strip()]:
        probe = make_fleet(size, random.Random(seed))
        prompt, output = mean_job_tokens()
        prefill = statistics.fmean(prompt / w.gpu.prefill_tok_s for w in probe)
        decode = statistics.fmean(output * w.gpu.itl_s * 1.3 for w in probe)
        rate = arrival_rate(sum(w.gpu.slots for w in probe), utilization, prefill, decode)
        arrivals = list(requests(rate, span, random.Random(seed + 1)))
        for rollback in (True, False):
            fleet = make_fleet(size, random.Random(seed))
            run = simulate_release(fleet, arrivals, span, scenario, rollback=rollback,
                                   seed=seed + 3)  # fmt: skip
            rows.append({"workers": size, "rate_per_s": rate, "duration_s": span,
                         "canary_share": canary, "candidate_fail_rate": fail_rate,
                         **run.as_dict()})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "release.json").write_text(json.dumps({"seed": seed, "rows": rows}, indent=2) + "\n")
    table = Table("workers", "rollback", "requests", "to candidate", "candidate failed",
                  "client errors", "rolled back at", title="A bad canary")  # fmt: skip
    for r in rows:
        at = r["rolled_back_at_s"]
        table.add_row(f"{r['workers']:,}", "on" if r["rollback"] else "off", f"{r['requests']:,}",
                      f"{r['candidate_requests']:,}", f"{r['candidate_failures']:,}",
                      f"{r['client_errors']:,}", "—" if at is None else f"{at:.1f} s")  # fmt: skip
    console.print(table)
    console.print(f"written: {out / 'release.json'}")


def demand_report(workers: str, duration: str, utilization: float, seed: int, out: Path) -> None:
    """Demand moving between three models (simulations.demand_shift): fixed configs, price
    discovery, and price discovery with scaling nodes, on the same seeded workload."""
    span = float(duration.split(",")[0])
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as progress:  # fmt: skip
        for size in [int(s) for s in workers.split(",") if s.strip()]:
            for mode in DEMAND_MODES:
                task = progress.add_task(f"{size:>7,} workers · {mode:<8}", total=1.0)
                started = time.perf_counter()

                def advance(done: float, task: TaskID = task) -> None:
                    progress.update(task, completed=done)

                row = simulate_demand(size, mode, span, utilization, seed, advance)
                progress.update(task, completed=1.0)
                rows.append({**row, "wall_s": time.perf_counter() - started})
    out.mkdir(parents=True, exist_ok=True)
    (out / "demand.json").write_text(json.dumps({"seed": seed, "rows": rows}, indent=2) + "\n")
    table = Table("workers", "mode", "requests", "unmet", "TTFT p99", "utilisation",
                  "idle providers", "switches", "mean price",
                  title="Demand moving between models")  # fmt: skip
    for r in rows:
        table.add_row(f"{r['workers']:,}", r["mode"], f"{r['requests']:,}",
                      f"{r['unmet_share']:.1%}", f"{r['ttft_p99_s']:.2f} s",
                      f"{r['provider_utilization']:.0%}", f"{r['idle_provider_share']:.1%}",
                      f"{r['model_switches']:,}",
                      f"{r['client_price_mean'] / 200_000:.2f}x")  # fmt: skip
    console.print(table)
    console.print(f"written: {out / 'demand.json'}")
