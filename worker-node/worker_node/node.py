"""A running node: engine(s) + job runner + coordinator session, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from protocol.advert import Advert, ModelOffer
from protocol.identity import Identity
from worker_node import __version__
from worker_node.engines.attach import AttachedEngine
from worker_node.engines.base import Engine
from worker_node.engines.vllm import VllmConfig, VllmEngine
from worker_node.jobs import JobRunner
from worker_node.session import SessionConfig, WorkerSession

log = logging.getLogger("agora.worker")


@dataclass(frozen=True)
class NodeConfig:
    coordinator: str  # host:port of the coordinator's worker endpoint
    key_path: Path  # Ed25519 node key (created on first start, mode 0600)
    served_model: str  # the model name this node advertises
    model: str | None = None  # spawn vLLM for this folder/hub id ...
    engine_url: str | None = None  # ... or attach to this OpenAI-compatible server
    price_prompt_per_mtok: int = 100_000  # micro-units per 1M prompt tokens
    price_completion_per_mtok: int = 200_000  # micro-units per 1M completion tokens
    max_concurrency: int = 8  # jobs accepted at once
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    engine_log: Path | None = None
    engine_args: tuple[str, ...] = ()
    engine_startup_timeout_s: float = 900.0


def make_engine(config: NodeConfig, on_progress: Callable[[float, str], None] | None) -> Engine:
    if config.engine_url:
        return AttachedEngine(config.engine_url, config.served_model)
    if not config.model:
        raise ValueError("give either a model to serve with vLLM or an engine URL to attach")
    return VllmEngine(
        VllmConfig(
            model=config.model,
            served_model=config.served_model,
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            extra_args=config.engine_args,
            log_path=config.engine_log,
            startup_timeout_s=config.engine_startup_timeout_s,
        ),
        on_progress=on_progress,
    )


async def context_length(client: httpx.AsyncClient, engine: Engine) -> int:
    """The engine's max model length as it reports it in /v1/models (vLLM does), else 0."""
    response = await client.get(f"{engine.base_url}/models")
    for card in response.json().get("data", []):
        if card.get("id") == engine.served_model:
            return int(card.get("max_model_len") or 0)
    return 0


async def run_node(
    config: NodeConfig,
    stop: asyncio.Event,
    on_progress: Callable[[float, str], None] | None = None,
    on_registered: Callable[[str], None] | None = None,
) -> None:
    identity = Identity.load_or_create(config.key_path)
    log.info("node id %s", identity.node_id)
    engine = make_engine(config, on_progress)
    await engine.start()
    try:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10), limits=limits
        ) as http:
            offer = ModelOffer(
                name=config.served_model,
                max_concurrency=config.max_concurrency,
                price_prompt_per_mtok=config.price_prompt_per_mtok,
                price_completion_per_mtok=config.price_completion_per_mtok,
                context_length=await context_length(http, engine),
            )

            def advert() -> Advert:
                return Advert(
                    node_id=identity.node_id,
                    issued_at_ms=time.time_ns() // 1_000_000,
                    models=(offer,),
                    software_version=__version__,
                    hardware={"machine": platform.machine(), "system": platform.system()},
                )

            runner = JobRunner(identity, {offer.name: engine}, {offer.name: offer}, http)
            session = WorkerSession(
                identity, advert, runner, SessionConfig(config.coordinator), on_registered
            )
            await session.run(stop)
    finally:
        await engine.stop()


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
