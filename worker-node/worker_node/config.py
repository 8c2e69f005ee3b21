"""The node's configuration file (TOML), written by `agora worker init`, read by `start`.

[node]
coordinator = "coordinator.example.org:50051"
key = "/home/me/.config/agora/node.key"

[[models]]
name = "llama-3-8b"
engine = "vllm"            # or "attach" with url = "http://127.0.0.1:8000/v1"
model = "meta-llama/Meta-Llama-3-8B-Instruct"
price_in = 100000          # micro-units per 1M prompt tokens
price_out = 200000
price_cached_in = 25000    # optional: prompt tokens found in the engine's prefix cache
# price = "auto"           # follow demand: from price_in/out (your cost) up to the ceiling
# price_ceiling_out = 800000

[[models]]
name = "bge-small"
task = "embed"             # /v1/embeddings, priced per input token (price_in)
model = "BAAI/bge-small-en-v1.5"
price_in = 20000
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.advert import DEFAULT_BATCH_DISCOUNT_BPS
from worker_node.errors import ConfigError


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "agora"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "agora" / "worker"


def default_config_path() -> Path:
    return config_dir() / "worker.toml"


def default_key_path() -> Path:
    return config_dir() / "node.key"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str = Field(min_length=1, max_length=200)  # the name clients ask for
    # "generate": chat and completions; "embed": /v1/embeddings (vLLM runs it with
    # --runner pooling --convert embed), priced per input token by price_in
    task: Literal["generate", "embed"] = "generate"
    engine: Literal["vllm", "attach"] = "vllm"
    model: str | None = None  # vllm: a local folder or a hub id
    url: str | None = None  # attach: the server's OpenAI base URL
    served_name: str | None = None  # attach: the model name the server answers to
    price_in: int = Field(default=100_000, ge=0)  # micro-units per 1M prompt tokens
    price_out: int = Field(default=200_000, ge=0)  # micro-units per 1M completion tokens
    # per 1M prompt tokens the engine finds in its prefix cache (<= price_in; None: price_in)
    price_cached_in: int | None = Field(default=None, ge=0)
    # basis points off every price for Batch API jobs (5000: half price, as OpenAI)
    batch_discount_bps: int = Field(default=DEFAULT_BATCH_DISCOUNT_BPS, ge=0, le=10_000)
    # "auto": the ask follows the coordinators' demand boards (worker_node.pricing), from
    # price_in/price_out (the floor: what serving costs you) up to the ceiling and back,
    # one of price_steps rungs per price_interval_s at most
    price: Literal["fixed", "auto"] = "fixed"
    price_ceiling_in: int | None = Field(default=None, ge=0)  # None: 4 x price_in
    price_ceiling_out: int | None = Field(default=None, ge=0)  # None: 4 x price_out
    price_steps: int = Field(default=10, ge=1, le=100)
    price_interval_s: float = Field(default=30.0, ge=0.5)
    max_concurrency: int = Field(default=8, ge=1, le=4096)  # jobs accepted at once
    max_model_len: int | None = Field(default=None, ge=16)
    dtype: str = "auto"
    quantization: str | None = None  # e.g. "awq", "fp8"; advertised to clients
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    lora_adapters: dict[str, str] = Field(default_factory=dict)  # adapter name -> path
    # registered adapters the coordinators send by hash, loaded at run time: at most this many
    # at once (0: none; vLLM runs with --enable-lora --max-loras N), of rank up to max_lora_rank
    max_loras: int = Field(default=0, ge=0, le=256)
    max_lora_rank: int = Field(default=16, ge=1, le=512)
    adapter_price_in: int | None = Field(default=None, ge=0)  # None: price_in
    adapter_price_out: int | None = Field(default=None, ge=0)  # None: price_out
    extra_args: list[str] = Field(default_factory=list)  # passed to `vllm serve` verbatim
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the engine

    @property
    def ceiling(self) -> tuple[int, int]:
        """(prompt, completion) the auto ask never goes above."""
        return (
            4 * self.price_in if self.price_ceiling_in is None else self.price_ceiling_in,
            4 * self.price_out if self.price_ceiling_out is None else self.price_ceiling_out,
        )

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelConfig:
        if self.engine == "vllm" and not self.model:
            raise ValueError("engine 'vllm' needs `model` (a folder or hub id)")
        if self.engine == "attach" and not self.url:
            raise ValueError("engine 'attach' needs `url` (the server's OpenAI base URL)")
        if self.price_cached_in is not None and self.price_cached_in > self.price_in:
            raise ValueError("price_cached_in cannot be above price_in (a cache hit costs less)")
        if self.price_ceiling_in is not None and self.price_ceiling_in < self.price_in:
            raise ValueError("price_ceiling_in cannot be below price_in (the floor)")
        if self.price_ceiling_out is not None and self.price_ceiling_out < self.price_out:
            raise ValueError("price_ceiling_out cannot be below price_out (the floor)")
        if self.task == "embed" and (self.max_loras or self.lora_adapters):
            raise ValueError("an embedding model (task = 'embed') serves no LoRA adapters")
        return self


class NodeSection(_Strict):
    coordinator: str | None = Field(default=None, pattern=r"^[^\s:]+:\d{1,5}$")  # host:port
    key: Path = Field(default_factory=default_key_path)
    state_dir: Path = Field(default_factory=state_dir)  # engine logs, status file
    drain_timeout_s: float = Field(default=60.0, gt=0)  # SIGTERM: let running jobs finish
    tls_ca: Path | None = None  # PEM of the coordinator's CA; set to use TLS
    # find coordinators through the p2p market's DHT instead of (or besides) `coordinator`
    discover: bool = False
    bootstrap: list[str] = Field(default_factory=list)  # libp2p multiaddrs ending in /p2p/<id>
    max_coordinators: int = Field(default=3, ge=1, le=16)  # sessions held at once
    p2p_listen: str = "/ip4/0.0.0.0/tcp/0"  # outbound DHT lookups only: any free port
    p2p_same_host: bool = False  # lift py-libp2p's per-IP limits (all peers on one machine)
    ban_s: float = Field(default=60.0, gt=0)  # a coordinator that dropped us is not retried
    # what this node declares in its signed advert, for clients whose policy requires it:
    # how long it keeps prompts and outputs ("none" = not kept beyond the job; "" = not
    # declared) and where it runs (e.g. "eu-west")
    data_retention: str = Field(default="", max_length=40, pattern=r"^[A-Za-z0-9_.-]*$")
    region: str = Field(default="", max_length=40, pattern=r"^[A-Za-z0-9_.-]*$")

    @model_validator(mode="after")
    def _where_to_connect(self) -> NodeSection:
        if not self.coordinator and not self.discover:
            raise ValueError("give `coordinator` (host:port) or set `discover = true`")
        if self.discover and not self.bootstrap:
            raise ValueError("`discover` needs at least one `bootstrap` peer")
        if self.discover and self.coordinator:
            raise ValueError("give either `coordinator` or `discover`, not both")
        return self


class HardwareSection(_Strict):
    """What `init` detected; informational (the advert re-detects at every start)."""

    summary: str = ""


class WorkerConfig(_Strict):
    node: NodeSection
    models: list[ModelConfig] = Field(min_length=1)
    hardware: HardwareSection = Field(default_factory=HardwareSection)

    @model_validator(mode="after")
    def _unique_names(self) -> WorkerConfig:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError("two [[models]] entries have the same name")
        return self


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "file"
    return f"{where}: {first['msg']}"


def parse(data: dict[str, Any], source: str = "config") -> WorkerConfig:
    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def load(path: Path) -> WorkerConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no config at {path}; run `agora worker init` first") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse(data, str(path))


def discovering(config: WorkerConfig, bootstrap: list[str]) -> WorkerConfig:
    """The same node, finding coordinators through the p2p market instead of its configured
    one (`agora worker start --discover [--bootstrap …]`)."""
    node = config.node.model_dump()
    node.update(coordinator=None, discover=True, bootstrap=bootstrap or config.node.bootstrap)
    return parse({**config.model_dump(), "node": node}, "--discover")


def dump(config: WorkerConfig, path: Path) -> None:
    data = config.model_dump(mode="json", exclude_none=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
