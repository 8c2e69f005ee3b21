"""`agora demo`: a whole market on this machine, and one real request through it.

Starts a coordinator and worker(s) (each spawning real vLLM with a tiny offline model), then
either sends a streamed chat completion through the official `openai` SDK and shows the text,
usage, the verified receipt and the balances (default), or keeps the market running for your
own client (`--serve`, which also runs a tiny embedding model for /v1/embeddings).
"""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import typer
from openai import OpenAI
from rich.console import Console
from rich.table import Table

from agora.stack import (
    TINY_ENGINE_ARGS,
    CoordinatorHandle,
    Process,
    StackError,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from billing.pricing import format_micro
from protocol.errors import ProtocolError
from protocol.receipt_document import verify_document
from worker_node.tiny_model import ensure_tiny_model

console = Console(stderr=True)
MODEL = "tiny"
EMBED_MODEL = "tiny-embed"  # the same tiny Llama, pooled into vectors (--serve only)
DEMO_CREDIT = 10_000_000  # 10 units of account currency, in micro-units


def _start_market(
    workdir: Path, workers: int, embeddings: bool = False
) -> tuple[CoordinatorHandle, list[Process], str]:
    with console.status("making the tiny model (first run only)…"):
        model_dir = ensure_tiny_model("tiny")
    console.print(f"model      {model_dir}")
    # the coordinator recounts tokens with the model's own tokenizer
    pinned = json.dumps({MODEL: str(model_dir), EMBED_MODEL: str(model_dir)})
    coordinator = start_coordinator(workdir, env={"AGORA_COORDINATOR_TOKENIZERS": pinned})
    console.print(f"coordinator {coordinator.base_url}  (workers dial {coordinator.grpc_target})")
    api_key = coordinator.create_client("demo", DEMO_CREDIT)
    procs = [
        start_worker(
            workdir,
            coordinator,
            WorkerSpec(
                name=f"worker-{i}",
                served_model=MODEL,
                model=str(model_dir),
                price_in=100_000 + 20_000 * i,
                price_out=200_000 + 40_000 * i,
                extra_args=TINY_ENGINE_ARGS,
            ),
        )
        for i in range(workers)
    ]
    if embeddings:
        embedder = WorkerSpec(
            name="embedder", served_model=EMBED_MODEL, model=str(model_dir), price_in=20_000,
            extra_args=[*TINY_ENGINE_ARGS, "--task", "embed"],
        )  # fmt: skip
        procs.append(start_worker(workdir, coordinator, embedder))
    try:
        with console.status("starting vLLM…") as status:
            wait_for_workers(
                coordinator,
                api_key,
                MODEL,
                workers,
                procs,
                on_wait=lambda s: status.update(
                    f"starting vLLM in {len(procs)} worker(s)… {s:.0f} s"
                ),
            )
            if embeddings:
                wait_for_workers(coordinator, api_key, EMBED_MODEL, 1, procs)
    except BaseException:
        _stop(coordinator, procs)
        raise
    console.print(f"workers    {workers} serving `{MODEL}`")
    if embeddings:
        console.print(f"           1 serving `{EMBED_MODEL}` (POST /v1/embeddings)")
    return coordinator, procs, api_key


def _stop(coordinator: CoordinatorHandle, procs: list[Process]) -> None:
    with console.status("shutting down…"):
        for proc in procs:
            proc.stop()
        coordinator.process.stop()
    console.print("stopped    every process the demo started")


def _one_request(coordinator: CoordinatorHandle, api_key: str) -> bool:
    with OpenAI(base_url=coordinator.base_url, api_key=api_key) as client:
        return _stream_and_settle(client, coordinator, api_key)


def _stream_and_settle(client: OpenAI, coordinator: CoordinatorHandle, api_key: str) -> bool:
    before = coordinator.balances()
    console.rule("streamed chat completion via the openai SDK")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say something about markets."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    response_id, usage = "", None
    for chunk in stream:
        response_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            usage = chunk.usage
    print(flush=True)
    if usage is None:
        console.print("[red]no usage chunk arrived[/]")
        return False
    print(
        f"usage: prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} total_tokens={usage.total_tokens}"
    )

    console.rule("receipt")
    fetched = httpx.get(
        f"{coordinator.base_url}/receipts/{response_id}",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    ).json()
    try:
        receipt = verify_document(fetched).receipts[0]  # every signature and shown field
        verified = True
    except ProtocolError as exc:
        print(f"receipt: NOT VERIFIED ({exc})")
        return False
    print(
        f"receipt: verified (worker {receipt.worker_id}, coordinator {fetched['coordinator_id']})"
    )
    print(
        f"receipt: request {receipt.request_id} model {receipt.model} "
        f"tokens {receipt.prompt_tokens}+{receipt.completion_tokens} "
        f"billed {fetched['amount_total']} micro-units"
    )
    matches = (receipt.prompt_tokens, receipt.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    print(f"receipt: token counts {'match' if matches else 'DO NOT match'} the usage")

    console.rule("balances")
    after = coordinator.balances()
    table = Table("account", "before", "after", "change")
    for name in sorted(after):
        change = after[name] - before.get(name, 0)
        table.add_row(
            name, format_micro(before.get(name, 0)), format_micro(after[name]), f"{change:+d}"
        )
    Console().print(table)
    total = sum(after.values())
    print(f"ledger: balances sum to {total} ({'balanced' if total == 0 else 'UNBALANCED'})")
    client_change = after["client:demo"] - before["client:demo"]
    print(f"ledger: client paid {-client_change} micro-units")
    return verified and matches and total == 0 and -client_change == fetched["amount_total"]


def _wait_for_signal() -> None:
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    while not stopped.is_set():
        time.sleep(0.2)


def demo(
    serve: bool = typer.Option(False, help="Keep the market running for your own client."),
    workers: int = typer.Option(1, min=1, max=8, help="Number of workers (each runs vLLM)."),
) -> None:
    """Run coordinator + worker(s) with real vLLM, then one request (or --serve)."""
    with tempfile.TemporaryDirectory(prefix="agora-demo-") as tmp:
        workdir = Path(tmp)
        try:
            coordinator, procs, api_key = _start_market(workdir, workers, embeddings=serve)
        except StackError as exc:
            console.print(f"[red]could not start the market:[/] {exc}")
            raise typer.Exit(1) from exc
        ok = True
        try:
            if serve:
                print(f"AGORA_BASE_URL={coordinator.base_url}", flush=True)
                print(f"AGORA_API_KEY={api_key}", flush=True)
                console.print("serving; Ctrl-C stops everything")
                _wait_for_signal()
            else:
                ok = _one_request(coordinator, api_key)
        finally:
            _stop(coordinator, procs)
    if not ok:
        raise typer.Exit(1)
