"""A policy-step plugin, installed for tests through a written dist-info (see `install`)."""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def install(target: Path) -> Path:
    """Make `target` a site directory holding the plugin and its entry point, as pip would
    (a module and its `.dist-info`); put it on the path (PYTHONPATH) to load it."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "agora_policy_example.py", target / "agora_policy_example.py")
    info = target / "agora_policy_example-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: agora-policy-example\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[agora.policy_steps]\nshouting = agora_policy_example:Shouting\n"
    )
    return target
