"""The pidfile reaper: an engine a dead node left running is killed (its whole process group)
before a new one starts; a pid now used by an unrelated process is left alone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from worker_node.engines.orphans import ENTRY, reap, remember


def _sleeper(*argv: str) -> subprocess.Popen[bytes]:
    """A long-running process with these arguments, in its own group (once it has exec'd)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", *argv], start_new_session=True
    )
    deadline = time.monotonic() + 10
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    while argv[0].encode() not in cmdline.read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def test_a_left_over_engine_is_killed_with_its_process_group(tmp_path: Path) -> None:
    engine = _sleeper(ENTRY.decode(), "serve")  # looks like our engine, leads its group
    pidfile = tmp_path / "engines" / "m.pid"
    remember(pidfile, engine.pid)
    try:
        assert reap(pidfile) == engine.pid
        assert engine.wait(timeout=10) < 0  # killed by a signal
        assert not pidfile.exists()
    finally:
        engine.kill()
        engine.wait()


def test_a_pid_reused_by_another_program_is_left_alone(tmp_path: Path) -> None:
    other = _sleeper("not-an-engine")
    engine = _sleeper(ENTRY.decode(), "serve")  # an engine, but not the one the file names
    pidfile = tmp_path / "m.pid"
    try:
        remember(pidfile, other.pid)
        assert reap(pidfile) is None
        assert other.poll() is None  # still running
        pidfile.write_text(f"{engine.pid} 1\n")  # the pid, with another process's start time
        assert reap(pidfile) is None
        assert engine.poll() is None
        assert reap(tmp_path / "missing.pid") is None
    finally:
        for process in (other, engine):
            process.kill()
            process.wait()
