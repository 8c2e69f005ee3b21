"""`agora worker …`: run a provider node."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer
from rich.console import Console

from worker_node.errors import WorkerError
from worker_node.node import NodeConfig, install_stop_signals, run_node

app = typer.Typer(help="Run a provider node: serve a model and sell its tokens.")
console = Console(stderr=True)


def default_key_path() -> Path:
    return Path(typer.get_app_dir("agora")) / "node.key"


@app.callback(invoke_without_command=True)
def worker(
    ctx: typer.Context,
    coordinator: str = typer.Option(..., help="Coordinator worker endpoint, HOST:PORT."),
    model: str | None = typer.Option(None, help="Model folder or hub id to serve with vLLM."),
    served_model_name: str | None = typer.Option(
        None, help="Name clients use (default: the model folder's name)."
    ),
    engine_url: str | None = typer.Option(
        None, help="Attach to a running OpenAI-compatible server instead of spawning vLLM."
    ),
    price_in: int = typer.Option(100_000, help="Micro-units per 1M prompt tokens."),
    price_out: int = typer.Option(200_000, help="Micro-units per 1M completion tokens."),
    max_concurrency: int = typer.Option(8, min=1, help="Jobs accepted at once."),
    max_model_len: int | None = typer.Option(None, help="vLLM --max-model-len."),
    dtype: str = typer.Option("auto", help="vLLM --dtype."),
    enforce_eager: bool = typer.Option(False, help="vLLM --enforce-eager (faster start)."),
    engine_log: Path | None = typer.Option(None, help="Where the engine's output goes."),
    key: Path = typer.Option(default_key_path, help="Node key file (created if missing)."),
    log_level: str = typer.Option("INFO", help="Logging level."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    name = served_model_name or (Path(model).name if model else None)
    if not name:
        raise typer.BadParameter("give --served-model-name when attaching with --engine-url")
    config = NodeConfig(
        coordinator=coordinator,
        key_path=key,
        served_model=name,
        model=model,
        engine_url=engine_url,
        price_prompt_per_mtok=price_in,
        price_completion_per_mtok=price_out,
        max_concurrency=max_concurrency,
        max_model_len=max_model_len,
        dtype=dtype,
        enforce_eager=enforce_eager,
        engine_log=engine_log,
    )

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        status = console.status("starting engine…")
        status.start()

        def progress(elapsed: float, state: str) -> None:
            status.update(f"engine {state} ({elapsed:.0f} s)")
            if state == "ready":
                status.stop()

        def registered(node_id: str) -> None:
            console.print(f"[green]serving[/] {name} as {node_id} via {coordinator}")

        try:
            await run_node(config, stop, on_progress=progress, on_registered=registered)
        finally:
            status.stop()

    try:
        asyncio.run(main())
    except WorkerError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
