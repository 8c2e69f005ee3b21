"""No Docker engine runs here: check what can be checked without one."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def test_compose_parses_and_names_its_services() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"postgres", "coordinator", "worker"}
    assert "postgresql" in services["coordinator"]["environment"]["AGORA_COORDINATOR_DATABASE_URL"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["worker"]["command"][0] == "--coordinator"


def test_every_build_references_existing_files() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    builds = [s["build"] for s in services.values() if "build" in s]
    assert len(builds) == 2
    for build in builds:
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        for source in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", dockerfile.read_text(), re.M):
            for item in source.split():
                assert (context / item).exists(), f"{dockerfile.name}: COPY {item} is missing"


def test_images_start_the_right_command() -> None:
    assert 'ENTRYPOINT ["agora", "worker"]' in (DOCKER / "worker.Dockerfile").read_text()
    assert "FROM vllm/vllm-openai" in (DOCKER / "worker.Dockerfile").read_text()
    assert 'ENTRYPOINT ["agora", "coordinator"]' in (DOCKER / "coordinator.Dockerfile").read_text()
