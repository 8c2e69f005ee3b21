"""Coordinator settings (environment variables AGORA_COORDINATOR_*, or CLI flags)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "agora" / "coordinator"


class ClusterMember(BaseModel):
    """One process of a `--processes N` coordinator, as its parent (coordinator.cluster) made it."""

    index: int  # 0 .. N-1
    sibling_grpc_ports: list[int]  # the others' worker ports, sent to workers at registration
    metrics_dir: Path  # prometheus_client's multiprocess directory: /metrics sums all processes
    # a process started again after dying waits up to this long for the workers to rejoin it
    # before it takes client connections (else it answers 404 "no worker" meanwhile)
    rejoin_s: float = 0.0


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGORA_COORDINATOR_", extra="ignore")

    host: str = "127.0.0.1"  # interface for both the HTTP API and the worker gRPC endpoint
    http_port: int = 8080  # OpenAI-compatible API; 0 = any free port
    grpc_port: int = 50051  # workers dial in here; 0 = any free port
    data_dir: Path = Field(default_factory=default_data_dir)  # key, admin token, SQLite file
    database_url: str | None = None  # default: SQLite file in data_dir
    fee_bps: int = Field(default=500, ge=0, le=10_000)  # network fee, basis points of price
    admin_token: str | None = None  # default: generated once into data_dir/admin_token
    heartbeat_interval_s: float = 5.0  # how often workers must report
    worker_timeout_s: float = 20.0  # drop a worker not heard from for this long
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    max_header_bytes: int = 32 * 1024  # larger request headers (all together) get 431
    # /metrics is open by default (Prometheus scrapes from inside the operator's network); set
    # a token to require `Authorization: Bearer <token>` there
    metrics_token: str | None = None
    first_token_timeout_s: float = 120.0  # per attempt: give up if no first token by then
    idle_token_timeout_s: float = 60.0  # give up if a running stream is silent this long
    default_max_tokens: int = 4096  # cost bound when neither request nor advert gives one
    breaker_cooldown_s: float = 5.0  # a failed worker sits out this long (doubling per failure)
    retry_after_s: int = 2  # Retry-After sent with 503 when no worker has capacity
    queue_timeout_s: float = 10.0  # a request finding every worker busy waits this long for a slot
    # answered requests whose receipts and charge the ledger writer has not committed yet; at
    # this many, answers wait for it (back-pressure: memory, and what a crash could leave
    # unbilled, stay bounded when requests end faster than the database takes them)
    max_unwritten_settlements: int = Field(default=256, ge=1)
    default_rpm: int | None = None  # per-key requests/min when the key sets none (None = no limit)
    default_tpm: int | None = None  # per-key tokens/min when the key sets none
    # credit holds in the database, so replicas sharing it never over-admit a client; default:
    # on for PostgreSQL, off for SQLite (one coordinator per file: holds stay in memory)
    shared_holds: bool | None = None
    hold_ttl_s: float = Field(default=3600.0, gt=0)  # a dead replica's holds stop counting then
    # the p2p market (libp2p: discovery + gossip). None = this coordinator stands alone
    p2p_listen: str | None = None  # multiaddr, e.g. /ip4/0.0.0.0/tcp/4001
    p2p_bootstrap: list[str] = Field(default_factory=list)  # multiaddrs ending in /p2p/<id>
    p2p_announce_s: float = Field(default=10.0, gt=0)  # DHT record + gossip round interval
    p2p_record_ttl_s: float = Field(default=30.0, gt=0)  # silent this long = dropped by peers
    p2p_same_host: bool = False  # lift py-libp2p's per-IP limits (all peers on one machine)
    public_grpc_target: str | None = None  # what discovered workers dial (default host:port)
    public_url: str | None = None  # the OpenAI base URL other coordinators point clients to
    tls_cert: Path | None = None  # PEM cert for the worker gRPC endpoint
    tls_key: Path | None = None
    ready_file: Path | None = None  # written with the bound ports once serving
    # processes serving this coordinator on one host (`--processes N`): they share the HTTP
    # port (SO_REUSEPORT: the kernel spreads connections), the database and the identity; each
    # has its own gRPC port and every worker holds a session with each (coordinator.cluster)
    processes: int = Field(default=1, ge=1, le=256)
    member: ClusterMember | None = None  # set by coordinator.cluster for each process it runs
    traffic_sample_s: float = Field(default=5.0, gt=0)  # the dashboard's traffic resolution
    # how often the model catalogue is re-read (other processes and replicas change it too)
    catalogue_refresh_s: float = Field(default=2.0, gt=0)
    # LoRA adapters: the largest archive an operator may register (kept in the database), and
    # routing by who holds an adapter loaded (off: any worker that can run it, at random; the
    # baseline of `agora bench adapters`), with what a cold load is assumed to cost in time to
    # first token (twice that on a worker whose adapter slots are all taken)
    adapter_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    adapter_affinity: bool = True
    adapter_cold_load_s: float = Field(default=1.0, ge=0)
    # prefix-aware routing: remember which workers were sent which prompt prefixes (at most
    # `prefix_index_blocks` blocks, forgotten after `prefix_ttl_s`, an engine's likely eviction)
    # and prefer the one holding the longest, by `prefix_cache_weight` x the cached share, while
    # its slots are less than `prefix_balance_load` full (a hot prefix spreads past that)
    prefix_routing: bool = True
    prefix_index_blocks: int = Field(default=200_000, ge=1)
    prefix_ttl_s: float = Field(default=600.0, gt=0)
    prefix_cache_weight: float = Field(default=2.0, ge=0)
    prefix_balance_load: float = Field(default=0.75, gt=0, le=1)
    # the exact response cache (requests opt in with X-Agora-Cache: on): answers kept at most
    # `response_cache_ttl_s`, `response_cache_max_bytes` in all; a hit costs the client
    # `response_cache_price_bps` of what the original answer cost (paid to the network, no
    # provider earns from a hit); keys per API key unless `response_cache_shared`
    response_cache: bool = True
    response_cache_ttl_s: float = Field(default=300.0, gt=0)
    response_cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    response_cache_price_bps: int = Field(default=0, ge=0, le=10_000)
    response_cache_shared: bool = False
    # the Files and Batch APIs: uploads up to `files_max_bytes` (kept under data_dir/files by
    # their SHA-256), batches of up to `batch_max_lines` requests; batch lines start only while
    # `batch_headroom_share` of a model's slots stay free for online traffic, at most
    # `batch_max_in_flight` at once; a running line's claim lasts `batch_lease_s` (then another
    # process may take a line whose runner died)
    files_max_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    batch_max_lines: int = Field(default=50_000, ge=1)
    batch_headroom_share: float = Field(default=0.25, ge=0, le=1)
    batch_max_in_flight: int = Field(default=64, ge=1)
    batch_lease_s: float = Field(default=600.0, gt=0)
    # latency objectives: a job slower than either is SLO-miss evidence against its worker
    slo_ttft_s: float = Field(default=10.0, gt=0)
    slo_itl_s: float = Field(default=0.5, gt=0)  # mean inter-token latency of the job
    spot_check_rate: float = Field(default=0.1, ge=0, le=1)  # checkable jobs re-scored elsewhere
    spot_check_probation_rate: float = Field(default=0.5, ge=0, le=1)  # for new workers
    slash_amount: int = Field(default=1_000_000, ge=0)  # bond taken per proven fraud (micro-units)
    # model name -> (prompt, completion) reserve price per 1M tokens: the lowest ask routed
    # (what a provider earns; clients pay the fee on top), on the demand board for nodes
    # that price themselves; e.g. AGORA_COORDINATOR_RESERVE_PRICES='{"llama": [50000, 100000]}'
    reserve_prices: dict[str, tuple[int, int]] = Field(default_factory=dict)
    # the board marks a model `wanted` while this many requests (or more) wait for a slot of
    # it: a call on providers to load it ("add replicas when queue depth exceeds 50"), per
    # model where set in wanted_queue_depths
    wanted_queue_depth: int = Field(default=50, ge=1)
    wanted_queue_depths: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    # model name -> local tokenizer directory the operator pins for recounting tokens
    tokenizers: dict[str, Path] = Field(default_factory=dict)
    # FAULT INJECTION for the crash-safety test only: exit right after a settlement's receipts
    # are committed and before its ledger posting (never set this in production)
    fault_exit_before_posting: bool = False

    @model_validator(mode="after")
    def _one_market_process(self) -> CoordinatorSettings:
        if self.processes > 1 and self.p2p_listen is not None:
            raise ValueError(
                "--processes > 1 cannot join the p2p market yet (one libp2p identity per host "
                "process); run one process with --p2p-listen, or several without it"
            )
        if self.processes > 1 and self.shared_holds is False:
            raise ValueError("--processes > 1 needs credit holds in the database (shared_holds)")
        return self

    @property
    def holds_in_database(self) -> bool:
        """Several processes (or replicas on PostgreSQL) must see each other's holds."""
        if self.shared_holds is not None:
            return self.shared_holds
        return self.processes > 1 or not self.resolved_database_url.startswith("sqlite")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'coordinator.db'}"
