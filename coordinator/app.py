"""Composition root: builds the coordinator's parts from settings and serves HTTP + gRPC on
one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine
from starlette.types import ASGIApp

from billing.pricing import Price
from coordinator import __version__
from coordinator.api import (
    adapter_routes,
    admin_routes,
    batch_routes,
    dashboard_routes,
    errors,
    model_routes,
    openai_routes,
    openapi,
    policy_routes,
)
from coordinator.api.batch_lines import line_runner
from coordinator.api.browser_sessions import BrowserSessions
from coordinator.api.grpc_session import WorkerSessionService
from coordinator.api.request_id import RequestIdMiddleware
from coordinator.config import CoordinatorSettings
from coordinator.errors import AuthenticationFailed
from coordinator.observability import Metrics
from coordinator.services.accounts import Accounts
from coordinator.services.adapters import AdapterLibrary
from coordinator.services.admission import Limits, RateLimiter
from coordinator.services.batches.files import FileLibrary
from coordinator.services.batches.runner import BatchPolicy, BatchRunner
from coordinator.services.decisions import DecisionLog
from coordinator.services.demand import DemandBook
from coordinator.services.metering import Tokenizers
from coordinator.services.overview import CPU_ONLY, Overview, gpu_type
from coordinator.services.payouts import Payouts
from coordinator.services.policy.book import PolicyBook
from coordinator.services.prefixes import PrefixIndex
from coordinator.services.registry import Registry
from coordinator.services.releases.book import ReleaseBook
from coordinator.services.request_path.cache_hit import CachedAnswers
from coordinator.services.request_path.dispatch import Dispatcher
from coordinator.services.request_path.outcomes import AttemptOutcomes
from coordinator.services.request_path.path import RequestPath
from coordinator.services.reservations import Reservations
from coordinator.services.response_cache import ResponseCache
from coordinator.services.router import Router
from coordinator.services.routing import RoutingPolicy
from coordinator.services.settlement import Settlement
from coordinator.services.shared_holds import SharedReservations
from coordinator.services.spot_check import SpotChecker
from coordinator.services.spot_judgement import CheckPolicy
from coordinator.services.stats import BreakerPolicy, StatsBook
from coordinator.services.traffic import TrafficHistory
from coordinator.services.trust import Trust
from coordinator.services.worker_gauges import WorkerGauges
from coordinator.store import outbox_store
from coordinator.store.db import make_engine, migrate
from coordinator.store.writer import LedgerWriter
from protocol.identity import Identity
from protocol.market import DemandBoard
from protocol.proto import session_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the p2p market needs libp2p, imported only when it is switched on
    from coordinator.services.network import MarketNetwork

log = logging.getLogger("agora.coordinator")


def load_or_create_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = "agora-admin-" + secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def prepare_data(settings: CoordinatorSettings) -> tuple[Identity, str, Engine]:
    """The start-up work on disk: identity key, admin token, schema, and the settlements a
    crash left half-done. Idempotent (a cluster's parent runs it before its children do)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(settings.data_dir / "coordinator.key")
    admin_token = settings.admin_token or load_or_create_token(settings.data_dir / "admin_token")
    db = make_engine(settings.resolved_database_url)
    migrate(db)
    reconciled = outbox_store.reconcile(db)
    if reconciled:
        log.warning("reconciled %d settlement(s) left unposted by the last run", reconciled)
    return identity, admin_token, db


class Coordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.identity, self.admin_token, self.db = prepare_data(settings)
        self.admin_token_file = settings.data_dir / "admin_token"
        self.writer = LedgerWriter(self.db)
        self.accounts = Accounts(self.db, Limits(settings.default_rpm, settings.default_tpm))
        self.payouts = Payouts(self.db, self.identity)
        self.tokenizers = Tokenizers(settings.tokenizers)
        self.settlement = Settlement(
            self.db, self.writer, self.identity, settings.fee_bps, self.tokenizers,
            exit_before_posting=settings.fault_exit_before_posting,
            max_unwritten=settings.max_unwritten_settlements,
        )  # fmt: skip
        self.trust = Trust(
            self.db, self.writer, slash_amount=settings.slash_amount,
            peer_evidence=self._peer_evidence,
        )  # fmt: skip
        self.trust.load()
        self.stats = StatsBook(BreakerPolicy(cooldown_s=settings.breaker_cooldown_s))
        self.registry = Registry(
            settings.fee_bps, quarantine_of=self.trust.quarantined,
            on_join=self.stats.reset_breaker,  # a restarted node starts with a closed breaker
        )  # fmt: skip
        self.member = settings.member  # None unless one process of `--processes N`
        self.metrics = Metrics(self.member.metrics_dir if self.member else None)
        self.metrics.watch(WorkerGauges(self.registry, self.stats))
        self.shared_holds = (
            SharedReservations(self.writer, settings.hold_ttl_s)
            if settings.holds_in_database
            else None
        )
        rng = random.Random()
        self.adapters = AdapterLibrary(self.db, settings.adapter_max_bytes)
        self.adapters.load()
        self.releases = ReleaseBook(
            self.db, metrics=self.metrics, rng=rng, refresh_s=settings.catalogue_refresh_s,
            tokenizer_of=self.settlement.tokenizer_fingerprint,
            adapter_base_of=self.adapters.base_of,
        )  # fmt: skip
        self.releases.load()
        dispatcher = Dispatcher(settings.first_token_timeout_s)
        checks = CheckPolicy(
            rate=settings.spot_check_rate, probation_rate=settings.spot_check_probation_rate
        )
        self.decisions = DecisionLog()
        holds = self.shared_holds or Reservations(self.accounts.balance)
        answers = None  # the response cache, when the operator keeps it on
        if settings.response_cache:
            cache = ResponseCache(settings.response_cache_max_bytes, settings.response_cache_ttl_s)
            answers = CachedAnswers(cache, self.db, self.writer, self.identity, holds,
                                    settings.response_cache_price_bps,
                                    settings.response_cache_shared)  # fmt: skip
        self.policies = PolicyBook(
            self.db, refresh_s=settings.catalogue_refresh_s,
            on_hit=lambda policy, step, entity, action, count: self.metrics.policy_actions.labels(
                policy, step, entity, action).inc(count),
        )  # fmt: skip
        self.policies.load()
        self.demand = DemandBook(
            self.registry, self._gpu_of, reserves=settings.reserve_prices,
            wanted_at=lambda m: settings.wanted_queue_depths.get(m, settings.wanted_queue_depth),
        )  # fmt: skip
        reserves = {model: Price(*ask).with_fee(settings.fee_bps)  # as clients see prices
                    for model, ask in settings.reserve_prices.items()}  # fmt: skip
        self.request_path = RequestPath(
            settings=settings,
            registry=self.registry,
            router=Router(
                self.registry,
                self.stats,
                self.trust,
                RoutingPolicy(
                    adapter_affinity=settings.adapter_affinity,
                    cold_load_s=settings.adapter_cold_load_s,
                    cache_weight=settings.prefix_cache_weight,
                    cache_balance_load=settings.prefix_balance_load,
                ),
                rng,
                PrefixIndex(settings.prefix_index_blocks, settings.prefix_ttl_s)
                if settings.prefix_routing
                else None,
                reserves={
                    m: (p.prompt_per_mtok, p.completion_per_mtok) for m, p in reserves.items()
                },
            ),
            reservations=holds,
            limiter=RateLimiter(),
            settlement=self.settlement,
            dispatcher=dispatcher,
            answers=answers,
            outcomes=AttemptOutcomes(
                self.stats, self.trust, self.metrics, settings.slo_ttft_s, settings.slo_itl_s
            ),
            decisions=self.decisions,
            spot_checker=SpotChecker(
                dispatcher, self.registry, self.trust, checks, rng, self.releases
            ),
            trust=self.trust,
            metrics=self.metrics,
            releases=self.releases,
            policies=self.policies,
            demand=self.demand,
            elsewhere=self._elsewhere,
        )
        self.files = FileLibrary(self.db, settings.data_dir / "files", settings.files_max_bytes,
                                 settings.batch_max_lines)  # fmt: skip
        self.batches = BatchRunner(
            self.db, self.files, self.registry, line_runner(self.request_path),
            owner=f"{self.identity.node_id}/{self.member.index if self.member else 0}",
            policy=BatchPolicy(
                headroom_share=settings.batch_headroom_share,
                max_in_flight=settings.batch_max_in_flight,
                lease_s=settings.batch_lease_s, max_lines=settings.batch_max_lines,
            ),
            served_by=self._served_by,
        )  # fmt: skip
        self.traffic = TrafficHistory(settings.traffic_sample_s)
        self.overview = Overview(
            self.registry, self.stats, self.trust, self.decisions, self.traffic,
            self.payouts, self.db,
        )  # fmt: skip
        self.sessions = BrowserSessions()
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self.network: MarketNetwork | None = None

    async def start_grpc(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
        service = WorkerSessionService(
            self.registry, self.identity, self.settings.heartbeat_interval_s,
            tuple(self.member.sibling_grpc_ports) if self.member else (),
            adapters=self.adapters, board=self.sealed_board,
        )  # fmt: skip
        pb_grpc.add_WorkerSessionServicer_to_server(service, server)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        if self.settings.tls_cert and self.settings.tls_key:
            creds = grpc.ssl_server_credentials(
                [(self.settings.tls_key.read_bytes(), self.settings.tls_cert.read_bytes())]
            )
            self.grpc_port = server.add_secure_port(address, creds)
        else:
            self.grpc_port = server.add_insecure_port(address)
        await server.start()
        self._grpc_server = server

    async def stop_grpc(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=5)
            self._grpc_server = None

    async def _await_rejoin(self, limit_s: float) -> None:
        """Until workers have come back and no more arrived for a second, at most `limit_s`."""
        deadline = time.monotonic() + limit_s
        count, since = 0, time.monotonic()
        while time.monotonic() < deadline:
            now_count = len(self.registry.all())
            if now_count != count:
                count, since = now_count, time.monotonic()
            elif count > 0 and time.monotonic() - since >= 1.0:
                break
            await asyncio.sleep(0.05)
        log.info("taking clients with %d worker(s) back", count)

    async def _expire_workers(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            for conn in self.registry.expire(self.settings.worker_timeout_s):
                log.warning("dropped worker %s: no heartbeat", conn.node_id)

    async def _sample_traffic(self) -> None:
        while True:
            self.traffic.sample(time.time(), self.metrics.totals())
            await asyncio.sleep(self.traffic.interval_s)

    def http_app(self) -> ASGIApp:
        @contextlib.asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await self.start_grpc()
            if self.member is not None and self.member.rejoin_s > 0:
                await self._await_rejoin(self.member.rejoin_s)  # before the HTTP port listens
            expiry = asyncio.create_task(self._expire_workers())
            sampler = asyncio.create_task(self._sample_traffic())
            catalogue = asyncio.create_task(self.releases.keep_fresh())
            # one process of a cluster runs batches (each would count the same free slots)
            batches = (asyncio.create_task(self.batches.run())
                       if self.member is None or self.member.index == 0 else None)  # fmt: skip
            try:
                yield
            finally:
                expiry.cancel()
                sampler.cancel()
                catalogue.cancel()
                if batches is not None:
                    batches.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await batches
                if self.network is not None:
                    await self.network.stop()
                await self.stop_grpc()
                await self.request_path.drain()
                await self.releases.drain()
                if self.shared_holds is not None:
                    await self.shared_holds.drain()
                await asyncio.to_thread(self.writer.close)

        app = FastAPI(title="Agora coordinator", version=__version__, lifespan=lifespan)
        app.state.request_path = self.request_path
        app.state.accounts = self.accounts
        app.state.settlement = self.settlement
        app.state.payouts = self.payouts
        app.state.admin_token = self.admin_token
        app.state.max_body_bytes = self.settings.max_body_bytes
        app.state.sessions = self.sessions
        app.state.overview = self.overview
        app.state.releases = self.releases
        app.state.adapters = self.adapters
        app.state.policies = self.policies
        app.state.files = self.files
        app.state.batches = self.batches
        app.state.network_view = self.network_view
        app.state.market = self.market
        errors.install(app)
        openapi.install(app)
        app.include_router(openai_routes.router)
        app.include_router(admin_routes.router)
        app.include_router(model_routes.router)
        app.include_router(adapter_routes.router)
        app.include_router(policy_routes.router)
        app.include_router(batch_routes.router)
        app.include_router(batch_routes.admin)
        app.include_router(dashboard_routes.router)
        static = StaticFiles(directory=dashboard_routes.STATIC)
        app.mount("/dashboard/static", static, name="dashboard-static")

        @app.get("/health")
        async def health() -> dict[str, object]:
            process = self.member.index if self.member else 0
            return {"status": "ok", "workers": len(self.registry.all()), "process": process}

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            """Prometheus metrics; behind a bearer token when `metrics_token` is set."""
            token = self.settings.metrics_token
            if token is not None:
                scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
                given_bytes, token_bytes = given.strip().encode(), token.encode()
                if scheme.lower() != "bearer" or not secrets.compare_digest(
                    given_bytes, token_bytes
                ):
                    raise AuthenticationFailed(
                        "/metrics needs the metrics token as a bearer token."
                    )
            exposed = generate_latest(self.metrics.exposed())
            return Response(exposed, media_type=CONTENT_TYPE_LATEST)

        return RequestIdMiddleware(app, self.settings.max_header_bytes)

    def endpoints(self) -> tuple[str, str]:
        """(what workers dial, what clients call), as announced to the p2p market."""
        host = self.settings.host
        return (
            self.settings.public_grpc_target or f"{host}:{self.grpc_port}",
            self.settings.public_url or f"http://{host}:{self.http_port}/v1",
        )

    async def start_network(self) -> None:
        from coordinator.services.network import MarketNetwork, NetworkSettings  # needs libp2p
        from p2p.node import P2PConfig

        s = self.settings
        assert s.p2p_listen is not None
        config = P2PConfig(
            listen=s.p2p_listen, bootstrap=tuple(s.p2p_bootstrap), dht_server=True,
            topics=("agora/market/v1",), same_host_peers=s.p2p_same_host,
            maintain_s=min(5.0, s.p2p_announce_s),
        )  # fmt: skip
        settings = NetworkSettings(config, s.p2p_announce_s, s.p2p_record_ttl_s)
        self.network = MarketNetwork(
            self.identity, settings, self.registry, self.trust, self.endpoints, self.sealed_board
        )
        await self.network.start()

    def _served_by(self, name: str) -> list[str]:
        """The served models behind a client's model name (a release's versions, or itself)."""
        targets = self.releases.targets(name, "")
        return [t.serves for t in targets] if targets else [name]

    def _gpu_of(self, node_id: str) -> str:
        conn = self.registry.get(node_id)
        return gpu_type(conn) if conn is not None else CPU_ONLY

    def sealed_board(self) -> bytes:
        """This coordinator's demand board, signed (GET /v1/market, and gossip)."""
        now_ms = time.time_ns() // 1_000_000
        return DemandBoard(self.identity.node_id, now_ms, self.demand.board()).seal(self.identity)

    def market(self) -> dict[str, Any]:
        """GET /v1/market: this coordinator's signed board, and its peers' as they signed them
        (each `{body, signature}` verifies with protocol.market.DemandBoard.open)."""
        peers = self.network.peer_boards() if self.network is not None else []
        return {"object": "market", **json.loads(self.sealed_board()),
                "peers": [json.loads(sealed) for sealed in peers]}  # fmt: skip

    def _elsewhere(self, model: str) -> list[str]:
        """Other coordinators of the p2p market that serve `model` (none without a market)."""
        return self.network.elsewhere(model) if self.network is not None else []

    def _peer_evidence(self, node_id: str) -> tuple[float, float] | None:
        return self.network.view.peer_evidence(node_id) if self.network is not None else None

    def p2p_addrs(self) -> list[str]:
        return self.network.node.addrs if self.network else []

    async def network_view(self) -> dict[str, Any]:
        if self.network is None:
            return {"enabled": False}
        return await self.network.describe()

    def describe(self) -> dict[str, object]:
        host = self.settings.host
        return {
            "base_url": f"http://{host}:{self.http_port}/v1",
            "http_port": self.http_port,
            "p2p_addrs": self.p2p_addrs(),
            "grpc_target": f"{host}:{self.grpc_port}",
            "grpc_port": self.grpc_port,
            "coordinator_id": self.identity.node_id,
            "admin_token_file": str(self.admin_token_file),
            "pid": os.getpid(),
        }

    async def serve(self, sock: socket.socket | None = None) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn handles both and runs the lifespan shutdown).

        `sock`: a bound socket to accept on instead of binding host:http_port (each process of
        a cluster binds its own with SO_REUSEPORT)."""
        config = uvicorn.Config(
            self.http_app(),
            host=self.settings.host,
            port=self.settings.http_port,
            log_level="warning",
            loop="none",  # the running loop (uvloop, from the CLI)
            http="httptools",
            timeout_graceful_shutdown=10,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock] if sock is not None else None))
        while not server.started:
            if task.done():
                await task  # raises what stopped it
                return
            await asyncio.sleep(0.02)
        self.http_port = server.servers[0].sockets[0].getsockname()[1]
        if self.settings.p2p_listen is not None:
            await self.start_network()
        info = self.describe()
        if self.settings.ready_file:
            tmp = self.settings.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(self.settings.ready_file)
        if self.member is None:  # a cluster's parent prints the one banner
            print_banner(info)
        await task


def print_banner(info: dict[str, Any]) -> None:
    """What an operator sees once the coordinator serves (`info` as Coordinator.describe, and a
    cluster's `processes`)."""
    p2p = "".join(f"\n  p2p          {addr}" for addr in info["p2p_addrs"])
    processes = info.get("processes", [])
    ports = ", ".join(str(p["grpc_port"]) for p in processes)
    print(
        f"Agora coordinator {info['coordinator_id']}\n"
        f"  OpenAI API   {info['base_url']}\n"
        f"  workers dial {info['grpc_target']}\n"
        f"  admin token  {info['admin_token_file']}"
        + p2p
        + (f"\n  processes    {len(processes)} (worker gRPC ports {ports})" if processes else ""),
        flush=True,
    )
