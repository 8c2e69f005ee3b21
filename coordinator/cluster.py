"""`agora coordinator --processes N`: one coordinator served by N processes on one host.

One Python event loop saturates near one core (issue 15: 0.91 core at 256 streams on an H100
node while the GPU had more to give). The parent here does the start-up work once (identity,
admin token, migrations, reconciliation), reserves the ports, and runs N children, each a whole
Coordinator:

- HTTP: every child binds the same port with SO_REUSEPORT and the kernel spreads connections
  across them. The parent keeps the port bound (never listening), so a restarted child gets it
  back and nobody else can take it.
- Workers: child 0 listens on the configured gRPC port, each other child on a port of its own;
  a worker's registration ack lists the others (`Registered.sibling_ports`) and the worker holds
  a session with every one, counting its jobs across them, so each process routes to every
  worker.
- State: the database (ledger, receipts, credit holds: held there so N processes never admit
  more than a client has), the identity and the admin token are shared. Per process: rate-limit
  windows, breaker and latency statistics, the routing decision log. /metrics and the
  dashboard's traffic sum every process's counters (prometheus_client's multiprocess mode).

A child that dies is started again (with backoff); SIGTERM or SIGINT stops them all gracefully.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from coordinator.config import ClusterMember, CoordinatorSettings
from coordinator.errors import CoordinatorError

log = logging.getLogger("agora.coordinator.cluster")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0


class ClusterError(CoordinatorError):
    """A process of the cluster could not start."""


def bind_shared(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (others may bind the same port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _stop_with_parent(parent_pid: int) -> None:
    """SIGTERM this child when its parent dies, even by SIGKILL (Linux prctl PDEATHSIG), so no
    orphan keeps the port; elsewhere the parent's own shutdown is all there is."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def serve_member(
    settings: dict[str, Any], log_level: str, log_format: str, parent_pid: int
) -> None:
    """A child's whole life: one Coordinator accepting on the shared HTTP port."""
    import uvloop  # imported here: the parent never runs a loop of its own

    from coordinator.app import Coordinator
    from coordinator.observability import configure_logging

    _stop_with_parent(parent_pid)
    configure_logging(log_level, log_format)
    member_settings = CoordinatorSettings(**settings)
    sock = bind_shared(member_settings.host, member_settings.http_port)
    uvloop.run(Coordinator(member_settings).serve(sock))


@dataclass
class _Child:
    member: ClusterMember
    grpc_port: int  # where workers reach this child
    ready_file: Path
    process: BaseProcess
    started_at: float = 0.0  # monotonic
    failures: int = 0  # deaths in a row; the restart waits longer each time
    restart_at: float | None = None  # monotonic; set while waiting to restart


class ProcessGroup:
    """The parent: owns the children's lifecycle (start, watch, restart, stop)."""

    def __init__(self, settings: CoordinatorSettings, log_level: str, log_format: str) -> None:
        self._settings = settings
        self._log = (log_level, log_format)
        self._context = multiprocessing.get_context("spawn")  # no inherited threads or engines
        self._stop = threading.Event()
        self._children: list[_Child] = []
        self._reserved: list[socket.socket] = []
        self._http_port = 0  # reserved in run()

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        from coordinator.app import prepare_data

        s = self._settings
        _identity, _token, db = prepare_data(s)  # once, first: key, token, schema, reconciliation
        db.dispose()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        run_dir = Path(tempfile.mkdtemp(prefix="agora-coordinator-"))
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # children inherit it
        try:
            self._http_port = self._reserve(s.http_port)
            grpc_ports = [self._reserve(s.grpc_port)]
            grpc_ports += [self._reserve(0) for _ in range(s.processes - 1)]
            for index, grpc_port in enumerate(grpc_ports):
                member = ClusterMember(
                    index=index,
                    sibling_grpc_ports=[p for p in grpc_ports if p != grpc_port],
                    metrics_dir=metrics_dir,
                )
                ready = run_dir / f"ready-{index}.json"
                process = self._spawn(member, grpc_port, ready)
                child = _Child(member, grpc_port, ready, process, started_at=time.monotonic())
                self._children.append(child)
            infos = self._wait_ready()
            if infos is not None:
                self._announce(infos)
                self._watch()
        finally:
            self._stop_children()
            for sock in self._reserved:
                sock.close()
            shutil.rmtree(run_dir, ignore_errors=True)

    def _reserve(self, port: int) -> int:
        try:
            sock = bind_shared(self._settings.host, port)
        except OSError as exc:
            raise ClusterError(f"cannot bind {self._settings.host}:{port}: {exc}") from exc
        self._reserved.append(sock)
        bound: int = sock.getsockname()[1]
        return bound

    def _spawn(self, member: ClusterMember, grpc_port: int, ready: Path) -> BaseProcess:
        ready.unlink(missing_ok=True)
        settings = self._settings.model_dump(mode="json")
        settings.update(
            http_port=self._http_port, grpc_port=grpc_port, ready_file=str(ready),
            member=member.model_dump(mode="json"),
        )  # fmt: skip
        process = self._context.Process(
            target=serve_member,
            args=(settings, *self._log, os.getpid()),
            name=f"coordinator-{member.index}",
        )
        process.start()
        return process

    def _wait_ready(self) -> list[dict[str, Any]] | None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(c.ready_file.exists() for c in self._children):
            for child in self._children:
                if not child.process.is_alive():
                    raise ClusterError(
                        f"coordinator process {child.member.index} exited with "
                        f"{child.process.exitcode} while starting (its log is above)"
                    )
            if time.monotonic() > deadline:
                raise ClusterError(f"coordinator processes not ready in {READY_TIMEOUT_S:.0f} s")
            if self._stop.wait(0.05):
                return None
        return [json.loads(c.ready_file.read_text()) for c in self._children]

    def _announce(self, infos: list[dict[str, Any]]) -> None:
        from coordinator.app import print_banner

        info = {
            **infos[0],
            "pid": os.getpid(),  # stopping this one stops them all
            "processes": [
                {"index": c.member.index, "pid": c.process.pid, "grpc_port": c.grpc_port}
                for c in self._children
            ],
        }
        if self._settings.ready_file is not None:
            tmp = self._settings.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(self._settings.ready_file)
        print_banner(info)

    def _watch(self) -> None:
        """Start again any child that dies, waiting 1, 2, 4 … 30 s after deaths in a row."""
        while not self._stop.wait(0.25):
            now = time.monotonic()
            for child in self._children:
                if child.restart_at is None and not child.process.is_alive():
                    ran_long = now - child.started_at > 60
                    child.failures = 1 if ran_long else child.failures + 1
                    delay = min(30.0, 2.0 ** (child.failures - 1))
                    log.error(
                        "coordinator process %d exited with %s; starting it again in %.0f s",
                        child.member.index, child.process.exitcode, delay,
                    )  # fmt: skip
                    child.restart_at = now + delay
                elif child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    rejoin = 2 * self._settings.heartbeat_interval_s + 2.0
                    child.member = child.member.model_copy(update={"rejoin_s": rejoin})
                    child.process = self._spawn(child.member, child.grpc_port, child.ready_file)
                    child.started_at = now

    def _stop_children(self) -> None:
        alive = [c.process for c in self._children if c.process.is_alive()]
        for process in alive:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("coordinator process %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
