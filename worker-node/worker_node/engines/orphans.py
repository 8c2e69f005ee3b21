"""An engine left running by a node that died before the engine's own watchdog could act (or
by an older node): found through the pidfile the node keeps beside the engine's log, and killed
with its whole process group before a new engine starts, so a GPU is never held twice.

The pid is only trusted if that very process (same start time) still runs vLLM through our
entry point and leads its own process group: a pid reused since, by anything, another node's
engine included, is left alone. Linux only (/proc)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENTRY = b"worker_node.engines.vllm_entry"


def remember(pidfile: Path, pid: int) -> None:
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{pid} {_started(pid)}\n")


def forget(pidfile: Path) -> None:
    pidfile.unlink(missing_ok=True)


def reap(pidfile: Path, wait_s: float = 10.0) -> int | None:
    """Kill the engine the pidfile names if it is still running, and wait for its process
    group to be gone (its GPU memory free again); its pid, or None."""
    try:
        pid_text, started = pidfile.read_text().split()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    forget(pidfile)
    if not _is_our_engine(pid, started):
        return None
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return pid


def _started(pid: int) -> str:
    """The process's start time (clock ticks since boot): with the pid, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _is_our_engine(pid: int, started: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return ENTRY in cmdline and os.getpgid(pid) == pid and _started(pid) == started != "?"
    except (OSError, ProcessLookupError):
        return False
