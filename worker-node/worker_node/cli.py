"""`agora worker …`: set up and run a provider node.

agora worker init --coordinator HOST:PORT --model PATH_OR_ID   # writes worker.toml + key
agora worker start                                              # runs from worker.toml
agora worker status                                             # what it advertises
agora worker login --coordinator-url URL                        # a provider dashboard link
agora worker --coordinator HOST:PORT --model PATH               # one-off, flags only
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import typer
import uvloop
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.login import login_message
from worker_node import config as config_file
from worker_node.config import WorkerConfig
from worker_node.errors import WorkerError
from worker_node.hardware import detect, propose_engine
from worker_node.node import Node, install_stop_signals, read_status

app = typer.Typer(help="Run a provider node: serve a model and sell its tokens.")
console = Console(stderr=True)


def default_key_path() -> Path:
    return config_file.default_key_path()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


def run(config: WorkerConfig, log_level: str) -> None:
    """Run a node until SIGINT/SIGTERM; errors become one line, never a traceback."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        status = console.status("starting engine…")
        status.start()

        def progress(elapsed: float, state: str) -> None:
            status.update(f"engine {state} ({elapsed:.0f} s)")

        def registered(node_id: str) -> None:
            status.stop()
            names = ", ".join(m.name for m in config.models)
            via = config.node.coordinator or "coordinators found in the p2p market"
            console.print(f"[green]serving[/] {names} as {node_id} via {via}")

        try:
            await Node(config, on_progress=progress, on_registered=registered).run(stop)
        finally:
            status.stop()

    try:
        uvloop.run(main())
    except WorkerError as exc:
        raise _fail(exc) from exc


@app.callback(invoke_without_command=True)
def worker(
    ctx: typer.Context,
    coordinator: str | None = typer.Option(None, help="Coordinator worker endpoint, HOST:PORT."),
    model: str | None = typer.Option(None, help="Model folder or hub id to serve with vLLM."),
    served_model_name: str | None = typer.Option(
        None, help="Name clients use (default: the model folder's name)."
    ),
    engine_url: str | None = typer.Option(
        None, help="Attach to a running OpenAI-compatible server instead of spawning vLLM."
    ),
    engine_model: str | None = typer.Option(
        None, help="With --engine-url: the model name that server uses (default: the same)."
    ),
    task: str = typer.Option(
        "generate", help="generate (chat, completions) or embed (/v1/embeddings, per input token)."
    ),
    price_in: int = typer.Option(100_000, help="Micro-units per 1M prompt tokens."),
    price_out: int = typer.Option(200_000, help="Micro-units per 1M completion tokens."),
    price_cached_in: int | None = typer.Option(
        None, min=0, help="Per 1M prompt tokens found in the engine's prefix cache (<= price-in)."
    ),
    batch_discount: int | None = typer.Option(
        None, min=0, max=10_000, help="Basis points off for Batch API jobs (default 5000: half)."
    ),
    price: str = typer.Option(
        "fixed",
        help="auto: follow demand, from --price-in/--price-out (your cost) up to the "
        "ceiling and back.",
    ),
    price_ceiling_in: int | None = typer.Option(None, min=0, help="auto: (default 4x price-in)."),
    price_ceiling_out: int | None = typer.Option(None, min=0, help="auto: (default 4x price-out)."),
    price_steps: int = typer.Option(10, min=1, help="auto: rungs from floor to ceiling."),
    price_interval: float = typer.Option(30.0, help="auto: seconds between two moves at most."),
    max_concurrency: int = typer.Option(8, min=1, help="Jobs accepted at once."),
    max_model_len: int | None = typer.Option(None, help="vLLM --max-model-len."),
    dtype: str = typer.Option("auto", help="vLLM --dtype."),
    enforce_eager: bool = typer.Option(False, help="vLLM --enforce-eager (faster start)."),
    max_loras: int = typer.Option(
        0, min=0, help="Registered LoRA adapters loaded at once, fetched by hash (0: none)."
    ),
    adapter_price_in: int | None = typer.Option(None, help="Prompt price with an adapter."),
    adapter_price_out: int | None = typer.Option(None, help="Completion price with an adapter."),
    key: Path = typer.Option(default_key_path, help="Node key file (created if missing)."),
    state_dir: Path | None = typer.Option(None, help="Engine logs and status file."),
    drain_timeout: float = typer.Option(60.0, help="On SIGTERM, seconds running jobs may take."),
    discover: bool = typer.Option(
        False, help="Find coordinators in the p2p market (DHT) instead of --coordinator."
    ),
    bootstrap: list[str] = typer.Option([], help="p2p bootstrap peer multiaddr; repeatable."),
    max_coordinators: int = typer.Option(3, min=1, help="With --discover: sessions at once."),
    p2p_same_host: bool = typer.Option(False, hidden=True),  # every peer on one machine (tests)
    data_retention: str = typer.Option(
        "", help="Declared in the signed advert: how long prompts/outputs are kept (none = not)."
    ),
    region: str = typer.Option("", help="Declared in the signed advert: where it runs."),
    log_level: str = typer.Option("INFO", help="Logging level."),
) -> None:
    """Without a subcommand: run a node from flags alone (no config file)."""
    if ctx.invoked_subcommand is not None:
        return
    if not coordinator and not discover:
        console.print(ctx.get_help())
        raise typer.Exit(2)
    name = served_model_name or (Path(model).name if model else None)
    if not name:
        raise typer.BadParameter("give --served-model-name when attaching with --engine-url")
    entry: dict[str, Any] = {
        "name": name,
        "engine": "attach" if engine_url else "vllm",
        "task": task,
        "model": model,
        "url": engine_url,
        "served_name": engine_model,
        "price_in": price_in,
        "price_out": price_out,
        "price_cached_in": price_cached_in,
        "batch_discount_bps": batch_discount,
        "price": price,
        "price_ceiling_in": price_ceiling_in,
        "price_ceiling_out": price_ceiling_out,
        "price_steps": price_steps,
        "price_interval_s": price_interval,
        "max_concurrency": max_concurrency,
        "max_model_len": max_model_len,
        "dtype": dtype,
        "enforce_eager": enforce_eager,
        "max_loras": max_loras,
        "adapter_price_in": adapter_price_in,
        "adapter_price_out": adapter_price_out,
    }
    node: dict[str, Any] = {
        "coordinator": coordinator,
        "key": key,
        "drain_timeout_s": drain_timeout,
        "discover": discover,
        "bootstrap": bootstrap,
        "max_coordinators": max_coordinators,
        "p2p_same_host": p2p_same_host,
        "data_retention": data_retention,
        "region": region,
    }
    if state_dir:
        node["state_dir"] = state_dir
    try:
        config = config_file.parse(
            {"node": {k: v for k, v in node.items() if v is not None},
             "models": [{k: v for k, v in entry.items() if v is not None}]}, "flags",
        )  # fmt: skip
    except WorkerError as exc:
        raise _fail(exc) from exc
    run(config, log_level)


@app.command()
def init(
    coordinator: str = typer.Option(..., prompt="Coordinator (HOST:PORT)", help="HOST:PORT."),
    model: str = typer.Option(..., prompt="Model folder or hub id", help="What vLLM serves."),
    name: str | None = typer.Option(None, help="Name clients use (default: model's name)."),
    engine_url: str | None = typer.Option(None, help="Attach to this server instead of vLLM."),
    task: str = typer.Option(
        "generate", help="generate (chat, completions) or embed (/v1/embeddings, per input token)."
    ),
    price_in: int = typer.Option(100_000, help="Micro-units per 1M prompt tokens."),
    price_out: int = typer.Option(200_000, help="Micro-units per 1M completion tokens."),
    price_cached_in: int | None = typer.Option(
        None, min=0, help="Per 1M prompt tokens found in the engine's prefix cache (<= price-in)."
    ),
    max_concurrency: int | None = typer.Option(None, help="Jobs at once (default: proposed)."),
    max_model_len: int | None = typer.Option(None, help="Context length (default: proposed)."),
    config: Path = typer.Option(config_file.default_config_path, help="Config file to write."),
    key: Path = typer.Option(default_key_path, help="Node key (created if missing)."),
    state_dir: Path | None = typer.Option(None, help="Engine logs and status file."),
    force: bool = typer.Option(False, help="Overwrite an existing config file."),
) -> None:
    """Detect this machine, propose an engine config, write the config file and node key."""
    if config.exists() and not force:
        raise _fail(ValueError(f"{config} exists; pass --force to overwrite it"))
    hardware = detect()
    proposal = propose_engine(hardware)
    entry: dict[str, Any] = {
        "name": name or Path(model.rstrip("/")).name,
        "engine": "attach" if engine_url else "vllm",
        "task": task,
        "model": model,
        "url": engine_url,
        "price_in": price_in,
        "price_out": price_out,
        "price_cached_in": price_cached_in,
        "max_concurrency": max_concurrency or proposal.max_concurrency,
        "max_model_len": max_model_len or proposal.max_model_len,
        "dtype": proposal.dtype,
        "tensor_parallel_size": proposal.tensor_parallel_size,
        "gpu_memory_utilization": proposal.gpu_memory_utilization,
        "enforce_eager": proposal.enforce_eager,
    }
    node: dict[str, Any] = {"coordinator": coordinator, "key": key}
    if state_dir:
        node["state_dir"] = state_dir
    try:
        parsed = config_file.parse(
            {
                "node": node,
                "models": [{k: v for k, v in entry.items() if v is not None}],
                "hardware": {"summary": hardware.summary()},
            },
            "init",
        )
        config_file.dump(parsed, config)
        from protocol.identity import Identity

        identity = Identity.load_or_create(key)
    except (WorkerError, OSError) as exc:
        raise _fail(exc) from exc
    table = Table("", "", show_header=False)
    table.add_row("hardware", hardware.summary())
    for field_name in (
        "dtype",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "enforce_eager",
        "max_concurrency",
    ):
        table.add_row(field_name, str(entry[field_name]))
    table.add_row("node id", identity.node_id)
    table.add_row("key", str(key))
    table.add_row("config", str(config))
    console.print(table)
    console.print(f"next: [bold]agora worker start --config {config}[/]")


@app.command()
def start(
    config: Path = typer.Option(config_file.default_config_path, help="Config file."),
    discover: bool = typer.Option(
        False, help="Find coordinators in the p2p market (DHT) instead of the configured one."
    ),
    bootstrap: list[str] = typer.Option([], help="p2p bootstrap peer multiaddr; repeatable."),
    log_level: str = typer.Option("INFO", help="Logging level."),
) -> None:
    """Run the node described by the config file until SIGINT/SIGTERM."""
    try:
        loaded = config_file.load(config)
        if discover or bootstrap:
            loaded = config_file.discovering(loaded, bootstrap)
    except WorkerError as exc:
        raise _fail(exc) from exc
    run(loaded, log_level)


def _show_models(models: list[dict[str, Any]], engines: dict[str, Any] | None) -> Table:
    table = Table("model", "price in/out (µ/1M)", "max conc.", "context", "engine", "state")
    for m in models:
        engine = (engines or {}).get(m["name"], {})
        state = engine.get("state", "not running")
        table.add_row(
            m["name"],
            f"{m['price_prompt_per_mtok']}/{m['price_completion_per_mtok']}",
            str(m["max_concurrency"]),
            str(m.get("context_length") or "?"),
            m.get("engine") or "",
            state,
        )
    return table


@app.command()
def status(
    config: Path = typer.Option(config_file.default_config_path, help="Config file."),
) -> None:
    """What this node advertises, and how its engines and session are doing."""
    try:
        loaded = config_file.load(config)
    except WorkerError as exc:
        raise _fail(exc) from exc
    out = Console()
    live = read_status(loaded.node.state_dir)
    if live is None:
        out.print(f"node not running (config {config})")
        models = [
            {
                "name": m.name,
                "price_prompt_per_mtok": m.price_in,
                "price_completion_per_mtok": m.price_out,
                "max_concurrency": m.max_concurrency,
                "context_length": m.max_model_len,
                "engine": m.engine,
            }
            for m in loaded.models
        ]
        out.print(_show_models(models, None))
        return
    age = time.time() - float(live["updated_at"])
    out.print(
        f"node {live['node_id']}  session [bold]{live['session']}[/] with {live['coordinator']}"
        f"  ({live['running_jobs']} running job(s), updated {age:.0f} s ago)"
    )
    out.print(f"hardware  {live['hardware']}")
    out.print(_show_models(live["advert"]["models"], live["engines"]))
    for name, engine in live["engines"].items():
        if engine.get("reaped_orphan_pid"):
            out.print(
                f"[yellow]{name}: killed engine pid {engine['reaped_orphan_pid']} at start, "
                "left running by a node that died[/]"
            )
    for name, auto in live.get("auto_prices", {}).items():  # each decision, and why
        out.print(f"[bold]{name}[/] auto price, rung {auto['rung']} of {auto['steps']}:")
        for decision in auto["decisions"][-5:]:
            ask = "/".join(str(p) for p in decision["ask"])
            when = time.strftime("%H:%M:%S", time.localtime(decision["at"]))
            out.print(f"  {when}  {ask}  {escape(decision['reason'])}")


@app.command()
def login(
    coordinator_url: str = typer.Option(
        ..., help="The coordinator's HTTP address, e.g. http://coordinator.example:8080."
    ),
    key: Path = typer.Option(default_key_path, help="This node's key file."),
) -> None:
    """Sign in to the provider dashboard: signs the coordinator's one-time challenge with the
    node key and prints a sign-in link (it works once, for a few minutes)."""
    try:
        identity = Identity.load(key)
        base = coordinator_url.rstrip("/")
        with httpx.Client(base_url=base, timeout=30) as client:
            challenge = client.get("/provider/v1/challenge").raise_for_status().json()["challenge"]
            signature = base64.b64encode(identity.sign(login_message(challenge))).decode()
            body = {"node_id": identity.node_id, "challenge": challenge, "signature": signature}
            response = client.post("/provider/v1/login", json=body)
            if response.status_code != 200:
                raise WorkerError(f"the coordinator refused the sign-in: {response.text}")
    except (WorkerError, ProtocolError, httpx.HTTPError) as exc:
        raise _fail(exc) from exc
    print(base + response.json()["url"])
