"""A running node: supervised engines + job runner + coordinator session, started and stopped
together, with a status file that `agora worker status` reads."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from protocol.advert import PROTOCOL_VERSION, Advert, ModelOffer
from protocol.identity import Identity
from protocol.market import DemandBoard, record_version
from protocol.proto import session_pb2 as pb
from worker_node import __version__
from worker_node.adapters import AdapterSlots
from worker_node.asks import Asks, AutoPrice
from worker_node.config import ModelConfig, WorkerConfig
from worker_node.discovery import CoordinatorFinder
from worker_node.engine_client import EngineClients
from worker_node.engines.attach import AttachedEngine
from worker_node.engines.base import Engine
from worker_node.engines.supervisor import EngineStatus, Supervisor
from worker_node.engines.vllm import VllmConfig, VllmEngine, vllm_build
from worker_node.faults import fault_from_env
from worker_node.hardware import Hardware, detect, gpu_loads
from worker_node.jobs import JobRunner
from worker_node.metrics import EngineLoad, read_engine_load
from worker_node.pricing import PriceLadder
from worker_node.session import SessionConfig, WorkerSession
from worker_node.session_pool import SessionPool

log = logging.getLogger("agora.worker")
STATUS_FILE = "status.json"
LOAD_FRESH_S = 0.25  # heartbeats within this of a reading share it (one per session otherwise)
GIVE_UP_AFTER = 2  # failed reconnects before a discovered coordinator is dropped for another


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def engine_version() -> str:
    build = vllm_build()
    return f"{build} {importlib.metadata.version(build)}" if build else ""


def make_engine(
    model: ModelConfig, state_dir: Path, on_progress: Callable[[float, str], None] | None = None
) -> Engine:
    if model.engine == "attach":
        assert model.url is not None
        return AttachedEngine(model.url, model.served_name or model.name)
    assert model.model is not None
    extra = list(model.extra_args)
    if model.task == "embed" and "--runner" not in extra:  # the same weights, pooled
        extra += ["--runner", "pooling", "--convert", "embed"]
    elif "--enable-prompt-tokens-details" not in extra:  # usage says how much hit the cache:
        extra.append("--enable-prompt-tokens-details")  # billed at the cached price
    env = dict(model.env)
    if model.lora_adapters or model.max_loras:
        extra += ["--enable-lora", "--max-lora-rank", str(model.max_lora_rank)]
    if model.max_loras:  # adapters loaded and unloaded at run time, by hash
        extra += ["--max-loras", str(model.max_loras), "--max-cpu-loras", str(model.max_loras)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if model.lora_adapters:
        extra += ["--lora-modules"]
        extra += [f"{name}={path}" for name, path in model.lora_adapters.items()]
    if model.quantization:
        extra += ["--quantization", model.quantization]
    return VllmEngine(
        VllmConfig(
            model=model.model,
            served_model=model.name,
            max_model_len=model.max_model_len,
            dtype=model.dtype,
            gpu_memory_utilization=model.gpu_memory_utilization,
            tensor_parallel_size=model.tensor_parallel_size,
            enforce_eager=model.enforce_eager,
            extra_args=tuple(extra),
            env=env,
            log_path=state_dir / "engines" / f"{_safe(model.name)}.log",
            pid_path=state_dir / "engines" / f"{_safe(model.name)}.pid",
        ),
        on_progress=on_progress,
    )


async def context_length(client: httpx.AsyncClient, engine: Engine) -> int:
    """The engine's max model length as it reports it in /v1/models (vLLM does), else 0."""
    try:
        response = await client.get(f"{engine.base_url}/models", timeout=10)
        cards = response.json().get("data", [])
    except (httpx.HTTPError, ValueError):
        return 0
    for card in cards:
        if card.get("id") == engine.served_model:
            return int(card.get("max_model_len") or 0)
    return 0


class Node:
    def __init__(
        self,
        config: WorkerConfig,
        on_progress: Callable[[float, str], None] | None = None,
        on_registered: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.fault = fault_from_env()  # refused (ConfigError) unless explicitly allowed
        if self.fault is not None:
            log.warning("FAULT MODE %s: this node misbehaves on purpose (tests only)",
                        self.fault.mode)  # fmt: skip
        self.identity = Identity.load_or_create(config.node.key)
        self.state_dir = config.node.state_dir
        self.hardware: Hardware = detect()
        self.supervisors = {
            m.name: Supervisor(m.name, make_engine(m, self.state_dir, on_progress), self._changed)
            for m in config.models
        }
        self.asks = Asks({  # the models priced by demand: their ladders
            m.name: AutoPrice(PriceLadder((m.price_in, m.price_out), m.ceiling, m.price_steps),
                              m.price_interval_s)
            for m in config.models if m.price == "auto"
        })  # fmt: skip
        self.adapters = {  # per model whose engine loads registered adapters at run time
            m.name: AdapterSlots(self.supervisors[m.name].engine, self.state_dir / "adapters",
                                 m.max_loras, self._adapters_changed,
                                 tag=self.identity.node_id[-8:])
            for m in config.models if m.max_loras
        }  # fmt: skip
        self._on_registered = on_registered
        self._issued_ms = 0  # the last advert's date (unix ms)
        self._session: SessionPool | None = None
        self._loads: dict[str, EngineLoad] = {}
        self._gpus: list[pb.GpuLoad] = []
        self._reading = asyncio.Lock()
        self._read_at = float("-inf")  # monotonic time of the last reading

    # ---------------------------------------------------------------- advert
    def _offer(self, model: ModelConfig, context: int) -> ModelOffer:
        attached = model.engine == "attach"
        return ModelOffer(
            name=model.name,
            max_concurrency=model.max_concurrency,
            price_prompt_per_mtok=model.price_in,
            price_completion_per_mtok=model.price_out,
            price_cached_prompt_per_mtok=model.price_cached_in,
            task=model.task,
            batch_discount_bps=model.batch_discount_bps,
            context_length=context,
            dtype=model.dtype,
            quantization=model.quantization or "",
            lora_adapters=tuple(sorted(model.lora_adapters)),
            max_loras=model.max_loras,
            adapter_price_prompt_per_mtok=model.adapter_price_in,
            adapter_price_completion_per_mtok=model.adapter_price_out,
            engine="attached OpenAI-compatible server" if attached else engine_version(),
        )

    def advert(self, coordinator_id: str = "") -> Advert:
        """A new advert of the node's asks to one coordinator (its reserve prices applied).
        Dated strictly after the last one: a coordinator takes only a newer advert."""
        now = time.time_ns() // 1_000_000
        if self._issued_ms - now > 5_000:  # the clock was set back: date from it again
            self._issued_ms = now
        self._issued_ms = max(now, self._issued_ms + 1)
        offers = self.asks.offers_for(coordinator_id)
        return Advert(
            node_id=self.identity.node_id,
            issued_at_ms=self._issued_ms,
            models=tuple(offers[m.name] for m in self.config.models if m.name in offers),
            protocol_version=PROTOCOL_VERSION,
            software={"agora": __version__, "engine": engine_version()},
            hardware=self.hardware.advert_fields(),
            data_retention=self.config.node.data_retention,
            region=self.config.node.region,
        )

    # ---------------------------------------------------------------- live state
    def _adapters_changed(self) -> None:
        if self._session is not None:
            self._session.notify()

    def _changed(self, name: str, status: EngineStatus) -> None:
        log.info("engine %s: %s", name, status.state)
        slots = self.adapters.get(name)
        if slots is not None and not self.supervisors[name].available:
            slots.forget()  # a restarted engine has none loaded
        if self._session is not None:
            self._session.notify()
        self.write_status()

    async def heartbeat(self, client: httpx.AsyncClient) -> pb.Heartbeat:
        """The live load every coordinator session reports. Sessions beat at the same moments
        (a job starting notifies all of them), so one reading serves every beat within
        LOAD_FRESH_S: the engines' metrics, NVML and the status file once, not once per
        session."""
        async with self._reading:
            if time.monotonic() - self._read_at > LOAD_FRESH_S:
                await self._read_loads(client)
                self._read_at = time.monotonic()
        beat = pb.Heartbeat()
        for name, sup in self.supervisors.items():
            load = self._loads.get(name, EngineLoad())
            beat.loads.append(
                pb.ModelLoad(
                    model=name,
                    running=load.running,
                    waiting=load.waiting,
                    kv_cache_usage=load.kv_cache_usage,
                    available=sup.available,
                    reaped_orphan_pid=sup.engine.reaped_pid or 0,
                    adapters=self.adapters[name].held() if name in self.adapters else (),
                    prefix_cache_queries=load.prefix_cache_queries,
                    prefix_cache_hits=load.prefix_cache_hits,
                    ask_note=self.asks.note(name),
                )
            )
        beat.gpus.extend(self._gpus)
        return beat

    async def _read_loads(self, client: httpx.AsyncClient) -> None:
        for name, sup in self.supervisors.items():
            load = EngineLoad()
            if sup.available:
                load = await read_engine_load(client, sup.engine.base_url, sup.engine.served_model)
            self._loads[name] = load
        self._gpus = [pb.GpuLoad(**asdict(gpu)) for gpu in await asyncio.to_thread(gpu_loads)]
        self.write_status()

    def status(self) -> dict[str, Any]:
        session = self._session
        return {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "node_id": self.identity.node_id,
            "coordinator": self.config.node.coordinator
            or ", ".join(session.coordinators if session else []),
            "session": session.state if session else "starting",
            "running_jobs": session.running_jobs if session else 0,
            "hardware": self.hardware.summary(),
            "engines": {
                name: {
                    "state": sup.status.state.value,
                    "restarts": sup.status.restarts,
                    "pid": sup.engine.pid,
                    "reaped_orphan_pid": sup.engine.reaped_pid,
                    "base_url": sup.engine.base_url,
                    "last_error": sup.status.last_error.splitlines()[0]
                    if sup.status.last_error
                    else "",
                    "load": asdict(self._loads.get(name, EngineLoad())),
                    "adapters": self.adapters[name].held() if name in self.adapters else [],
                    "adapter_loads": self.adapters[name].cold_loads if name in self.adapters else 0,
                }
                for name, sup in self.supervisors.items()
            },
            "advert": json.loads(self.advert().to_bytes()),
            "auto_prices": self.asks.describe(),
        }

    def write_status(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(self.status(), indent=2))
        tmp.replace(self.state_dir / STATUS_FILE)

    # ---------------------------------------------------------------- lifecycle
    async def _start_engines(self) -> None:
        starts = [asyncio.create_task(s.start()) for s in self.supervisors.values()]
        try:
            await asyncio.gather(*starts)
        except BaseException:
            for task in starts:
                task.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in self.supervisors.values()))
            raise

    async def run(self, stop: asyncio.Event) -> None:
        log.info("node id %s; %s", self.identity.node_id, self.hardware.summary())
        self.write_status()
        await self._start_engines()
        engines_stop = asyncio.Event()
        engines_http = EngineClients(sum(m.max_concurrency for m in self.config.models))
        http = engines_http.probes
        try:
            try:
                for model in self.config.models:
                    engine = self.supervisors[model.name].engine
                    self.asks.set(self._offer(model, await context_length(http, engine)))
                engines = {name: s.engine for name, s in self.supervisors.items()}
                runner = JobRunner(
                    self.identity,
                    engines,
                    self.asks,
                    engines_http,
                    is_available=lambda name: self.supervisors[name].available,
                    fault=self.fault,
                    adapters=self.adapters,
                )
                cfg = self.config.node
                root_certs = cfg.tls_ca.read_bytes() if cfg.tls_ca else None

                def session(target: str, give_up_after: int | None = None) -> WorkerSession:
                    return WorkerSession(
                        self.identity,
                        self.advert,
                        runner,
                        SessionConfig(target, drain_timeout_s=cfg.drain_timeout_s,
                                      root_certificates=root_certs, give_up_after=give_up_after),
                        heartbeat=lambda: self.heartbeat(http),
                        on_registered=self._registered,
                    )  # fmt: skip

                watchers = [
                    asyncio.create_task(s.watch(engines_stop)) for s in self.supervisors.values()
                ]
                pricing = asyncio.create_task(self.asks.follow(self._boards, self._repriced, stop))
                try:
                    if cfg.discover:
                        await self._run_discovered(stop, session)
                    else:
                        assert cfg.coordinator is not None
                        self._session = SessionPool.for_coordinator(cfg.coordinator, session)
                        await self._session.run(stop)
                finally:
                    pricing.cancel()
                    await asyncio.gather(pricing, return_exceptions=True)
                    engines_stop.set()
                    await asyncio.gather(*watchers, return_exceptions=True)
            finally:
                await engines_http.aclose()
        finally:
            await asyncio.gather(*(s.stop() for s in self.supervisors.values()))
            self.write_status()

    async def _run_discovered(
        self, stop: asyncio.Event, session: Callable[[str, int | None], WorkerSession]
    ) -> None:
        """Find coordinators in the p2p market's DHT and hold sessions with several."""
        from p2p.node import P2PConfig, P2PNode  # libp2p: imported only when discovering

        cfg = self.config.node
        p2p = P2PNode(
            self.identity.seed(),
            P2PConfig(listen=cfg.p2p_listen, bootstrap=tuple(cfg.bootstrap), dht_server=False,
                      same_host_peers=cfg.p2p_same_host, maintain_s=2.0, op_timeout_s=12.0),
            record_version=record_version,
        )  # fmt: skip
        await p2p.start()
        try:
            finder = CoordinatorFinder(p2p, [m.name for m in self.config.models])
            self._session = SessionPool(
                finder, lambda target: session(target, GIVE_UP_AFTER), cfg.max_coordinators,
                ban_s=cfg.ban_s, rediscover_s=2.0,
            )  # fmt: skip
            await self._session.run(stop)
        finally:
            await p2p.stop()

    async def _boards(self) -> list[DemandBoard]:
        return await self._session.boards() if self._session is not None else []

    def _repriced(self) -> None:
        if self._session is not None:
            self._session.readvertise()
        self.write_status()

    def _registered(self, node_id: str) -> None:
        self.write_status()
        if self._on_registered:
            self._on_registered(node_id)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The status a running node wrote, or None if no node is running there."""
    try:
        status: dict[str, Any] = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(status["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return status


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
